"""Ground truth of the images, its files' writer and reader side by side: per-image mask files (``.npz``, the demo's
planted traits or a user's masks, `mask_path` in the manifest) and CUB-style part keypoints, mapped into the model's
eval crop (`GroundTruth`, `load_ground_truth`), for the localization scores (`taxotrait.localization`), the named
traits (`taxotrait.traits`) and the evaluation.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .io import parquet_columns

# ---------------------------------------------------------------- the eval crop (resize, then centre crop)
def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) of an image whose shorter side is resized to `resize` (as torchvision's Resize(int))."""
    return (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)


def centre_crop(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the central `size` x `size` crop of a width x height image."""
    return round((width - size) / 2), round((height - size) / 2)


def crop_geometry(width: int, height: int, resize: int, img_size: int) -> tuple[float, float, float]:
    """(scale, left, top) of the eval transform (`taxotrait.data.ImageTransform`): shorter side resized to `resize`,
    central `img_size` crop."""
    return (resize / min(width, height), *centre_crop(*resized_size(width, height, resize), img_size))


def exclusive_masks(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Nested masks -> disjoint ones: each pixel belongs only to the smallest mask covering it (ties: the first)."""
    exclusive, taken = {}, np.zeros(next(iter(masks.values())).shape, bool)
    for name in sorted(masks, key=lambda n: int(masks[n].sum())):
        exclusive[name] = masks[name].astype(bool) & ~taken
        taken |= exclusive[name]
    return {name: exclusive[name] for name in masks}



# ---------------------------------------------------------------- mask files
def save_masks(path: str | os.PathLike, masks: dict[str, np.ndarray]) -> None:
    """A compressed .npz of bool arrays, without timestamps (byte-identical for identical masks)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in masks:
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(masks[key], dtype=bool), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def load_masks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The masks of one image: ``MASK_KEYS`` -> bool arrays of shape (H, W)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].astype(bool, copy=False) for k in z.files}


BACKGROUND = "background"  # the part of a point in no mask
KEYPOINTS = "keypoints"  # the target of the keypoint pointing game: any visible part keypoint


def crop_mask(mask: np.ndarray, resize: int, img_size: int) -> np.ndarray:
    """A mask [H, W] of the original image -> bool [img_size, img_size] in the eval crop (nearest neighbour)."""
    height, width = mask.shape
    scale, left, top = crop_geometry(width, height, resize, img_size)
    xs = np.clip(np.floor((np.arange(img_size) + left + 0.5) / scale), 0, width - 1).astype(int)
    ys = np.clip(np.floor((np.arange(img_size) + top + 0.5) / scale), 0, height - 1).astype(int)
    return mask.astype(bool)[np.ix_(ys, xs)]


def crop_points(points: np.ndarray, width: int, height: int, resize: int, img_size: int) -> np.ndarray:
    """Points [n, 2] (x, y) in original image pixels -> the same points in eval-crop pixels."""
    scale, left, top = crop_geometry(width, height, resize, img_size)
    return np.asarray(points, dtype=np.float64).reshape(-1, 2) * scale - np.array([left, top], dtype=np.float64)


@dataclass
class GroundTruth:
    """Ground truth of one image in eval-crop pixels: named masks (bool [S, S]) and/or visible part keypoints."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    points: dict[str, tuple[float, float]] = field(default_factory=dict)

    def targets(self, size: int, tolerance: float, grid: tuple[int, int]) -> dict[str, tuple[np.ndarray, ...]]:
        """What a map should point at, by target name: (strict, near, area) bool [size, size].

        - masks: strict = the mask; near = pixels within `tolerance` of it (the literature's pointing game);
          area = the mask (the energy-based game's target);
        - keypoints, one target `KEYPOINTS`: strict = the patches (`grid`) holding a visible keypoint; near = area =
          discs of radius `tolerance` around every visible keypoint."""
        if self.masks:
            return {name: (m, near_mask(m, tolerance), m) for name, m in self.masks.items()}
        if self.points:
            xy = np.array(list(self.points.values()))
            discs = keypoint_mask(xy, size, tolerance)
            return {KEYPOINTS: (keypoint_patches(xy, size, grid), discs, discs)}
        return {}

    @cached_property
    def regions(self) -> dict[str, np.ndarray]:
        """The masks as disjoint regions (`exclusive_masks`), computed once."""
        return exclusive_masks(self.masks)

    def part_at(self, x: float, y: float) -> str:
        """The part at crop point (x, y): the most specific (smallest) mask containing its pixel, else `BACKGROUND`;
        with keypoints, the nearest visible keypoint ('' when the image has none)."""
        if self.masks:
            size = next(iter(self.masks.values())).shape
            row, col = min(max(int(y), 0), size[0] - 1), min(max(int(x), 0), size[1] - 1)
            inside = [name for name, m in self.regions.items() if m[row, col]]
            return inside[0] if inside else BACKGROUND
        if self.points:
            names = list(self.points)
            xy = np.array([self.points[n] for n in names])
            return names[int(np.argmin(((xy - (x, y)) ** 2).sum(1)))]
        return ""


def near_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """bool mask: pixels whose centre lies within `radius` pixels of a pixel of `mask` (none for an empty mask)."""
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    return distance_transform_edt(~mask) <= radius if mask.any() else np.zeros_like(mask)


def keypoint_patches(points: np.ndarray, size: int, grid: tuple[int, int]) -> np.ndarray:
    """bool [size, size]: the patches of a `grid` over the crop that hold one of `points` [n, 2] (x, y)."""
    h, w = grid
    rows = np.clip((np.asarray(points, dtype=np.float64).reshape(-1, 2)[:, 1] * h / size).astype(int), 0, h - 1)
    cols = np.clip((np.asarray(points, dtype=np.float64).reshape(-1, 2)[:, 0] * w / size).astype(int), 0, w - 1)
    cells = np.zeros((h, w), dtype=bool)
    cells[rows, cols] = True
    return cells[np.ix_(np.arange(size) * h // size, np.arange(size) * w // size)]


def keypoint_mask(points: np.ndarray, size: int, radius: float) -> np.ndarray:
    """bool [size, size]: pixels whose centre lies within `radius` of one of `points` [n, 2] (x, y)."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    inside = np.zeros((size, size), dtype=bool)
    for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        inside |= (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
    return inside


def part_annotation_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The files of CUB-style part annotations in `folder` (the dataset root holding ``parts/``, or the ``parts``
    folder itself): part_names (``parts.txt``), part_locs (``part_locs.txt``) and, when there is one, part_images
    (``images.txt`` beside ``parts/``)."""
    folder = Path(folder)
    parts_dir = folder / "parts" if (folder / "parts" / "part_locs.txt").is_file() else folder
    files = {"part_locs": parts_dir / "part_locs.txt", "part_names": parts_dir / "parts.txt"}
    if (parts_dir.parent / "images.txt").is_file():
        files["part_images"] = parts_dir.parent / "images.txt"
    return files


def read_part_locations(folder: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """CUB-style part annotations: (keypoints, images).

    `folder` is the dataset root holding ``parts/parts.txt`` (``<part_id> <name>``) and ``parts/part_locs.txt``
    (``<image_id> <part_id> <x> <y> <visible>``, pixels of the original image), or the ``parts`` folder itself.
    keypoints: image_key (string), part (name), x, y, visible (bool). images: image_key, path from ``images.txt``
    (``<image_id> <relative path>``) beside ``parts/``, or None when there is none.
    """
    files = part_annotation_files(folder)
    for key in ("part_names", "part_locs"):
        if not files[key].is_file():
            raise FileNotFoundError(f"part annotations: {files[key]} not found")
    names = {}
    for line in files["part_names"].read_text().splitlines():
        if line.strip():
            part_id, name = line.strip().split(maxsplit=1)
            names[part_id] = name
    locs = pd.read_csv(files["part_locs"], sep=r"\s+", header=None, dtype=str,
                       names=["image_key", "part_id", "x", "y", "visible"])
    keypoints = pd.DataFrame({
        "image_key": locs["image_key"], "part": locs["part_id"].map(names).fillna(locs["part_id"]),
        "x": locs["x"].astype(float), "y": locs["y"].astype(float), "visible": locs["visible"].astype(float) > 0,
    })
    images = None
    if "part_images" in files:
        images = pd.read_csv(files["part_images"], sep=r"\s+", header=None, dtype=str, names=["image_key", "path"])
    return keypoints, images


def match_part_images(manifest: pd.DataFrame, keypoints: pd.DataFrame, images: pd.DataFrame | None) -> pd.Series:
    """The annotation key of each manifest row ('' without annotations): through ``images.txt`` when given (the
    manifest path ends with its relative path), else the manifest's image_id is the annotation's image id."""
    if images is not None:
        by_path = {p.replace("\\", "/"): key for key, p in zip(images["image_key"], images["path"])}
        keys = []
        for path in manifest["path"].astype(str):
            parts = path.replace("\\", "/").split("/")
            keys.append(next((by_path[s] for s in ("/".join(parts[i:]) for i in range(len(parts))) if s in by_path), ""))
        return pd.Series(keys, index=manifest.index, dtype="string")
    known = set(keypoints["image_key"])
    return manifest["image_id"].astype(str).where(manifest["image_id"].astype(str).isin(known), "").astype("string")


def ground_truth_columns(manifest_path: str | os.PathLike, parts: str | os.PathLike | None = None) -> list[str]:
    """The columns of the manifest.parquet at `manifest_path` that `load_ground_truth` reads: image_id, mask_path
    where the manifest has it and, with part annotations (`parts`), path."""
    masks = ["mask_path"] if "mask_path" in parquet_columns(manifest_path) else []
    return ["image_id", *masks, *(["path"] if parts else [])]


def load_ground_truth(manifest: pd.DataFrame, resize: int, img_size: int,
                      parts: str | os.PathLike | None = None) -> dict[str, GroundTruth]:
    """Ground truth of the manifest's images in eval-crop pixels, by image_id: masks from the `mask_path` column
    (`load_masks`) and/or keypoints of the CUB-style part
    annotations in folder `parts`. Images without any ground truth are left out."""
    truth: dict[str, GroundTruth] = {}
    if "mask_path" in manifest.columns:
        for image_id, path in zip(manifest["image_id"], manifest["mask_path"]):
            if isinstance(path, str) and path:
                masks = {name: crop_mask(m, resize, img_size) for name, m in load_masks(path).items()}
                truth[str(image_id)] = GroundTruth(masks=masks)
    if parts:
        from PIL import Image

        keypoints, images = read_part_locations(parts)
        keys = match_part_images(manifest, keypoints, images)
        visible = keypoints[keypoints["visible"]].groupby("image_key")
        groups = {key: rows for key, rows in visible}
        for image_id, path, key in zip(manifest["image_id"], manifest["path"], keys):
            if not key or key not in groups:
                continue
            with Image.open(path) as image:
                width, height = image.size
            rows = groups[key]
            xy = crop_points(rows[["x", "y"]].to_numpy(), width, height, resize, img_size)
            inside = (xy >= 0).all(1) & (xy < img_size).all(1)
            points = {part: (float(x), float(y)) for part, (x, y), ok in zip(rows["part"], xy, inside) if ok}
            truth.setdefault(str(image_id), GroundTruth()).points.update(points)
    return truth
