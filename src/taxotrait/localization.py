"""Where the trait heads point, scored against ground-truth masks (the demo's planted traits).

Pointing game: a head hits a mask when its attention peak's patch, mapped back from the model's input crop to the
original image, overlaps the mask. The random baseline is the share of patches that overlap it. Masks may nest (the
demo's body contains its stripe region and marks), so each is scored twice: as planted, and as its exclusive region
(each pixel given to the smallest mask covering it), where a peak on the stripes no longer also counts for the body.

Below, the ground truth in the model's input crop (masks, or CUB-style part keypoints) and the metrics that score
whole saliency maps against it: pointing game, energy-based pointing game, the part a head points to, part
consistency (used by `taxotrait.evaluation` and the named traits of `taxotrait.traits`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .intervals import mean_with_intervals

POINTING_RATES = {"hit_rate": "hit", "random_rate": "random", "tolerance_hit_rate": "near",
                  "tolerance_random_rate": "near_random", "centre_rate": "centre"}  # rate: per-image column
POINTING_COLUMNS = {"rank": "string", "mask": "string", "region": "string", "hit_rate": "float64",
                    "random_rate": "float64", "n_images": "int64", "tolerance_hit_rate": "float64",
                    "tolerance_random_rate": "float64", "centre_rate": "float64", "contrast": "string",
                    **{f"{rate}_{end}": "float64" for rate in POINTING_RATES for end in ("low", "high")}}
TOLERANCE_AT_224 = 15.0  # the pointing game's standard tolerance, in pixels of a 224 px input
PLANTED, EXCLUSIVE = "planted", "exclusive"  # the values of `region`


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


def patch_boxes(grid: tuple[int, int], width: int, height: int, resize: int, img_size: int) -> np.ndarray:
    """Every patch's box [h*w, 4] (x0, y0, x1, y1) in original image pixels, row-major."""
    h, w = grid
    scale, left, top = crop_geometry(width, height, resize, img_size)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x0, y0 = left + xs.ravel() * img_size / w, top + ys.ravel() * img_size / h
    boxes = np.stack([x0, y0, x0 + img_size / w, y0 + img_size / h], axis=1) / scale
    return boxes


def box_hits(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each box [n, 4] contains at least one mask pixel (pixel centres inside the box)."""
    integral = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    height, width = mask.shape
    x0 = np.clip(np.ceil(boxes[:, 0] - 0.5), 0, width).astype(int)
    y0 = np.clip(np.ceil(boxes[:, 1] - 0.5), 0, height).astype(int)
    x1 = np.clip(np.ceil(boxes[:, 2] - 0.5), 0, width).astype(int)
    y1 = np.clip(np.ceil(boxes[:, 3] - 0.5), 0, height).astype(int)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside > 0


def top_trait_heads(heads: pd.DataFrame) -> pd.DataFrame:
    """Per image, the head removed last by greedy masking: the one the class depends on most."""
    return heads.loc[heads.groupby("image_id")["removal_step"].idxmax()].reset_index(drop=True)


def exclusive_masks(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Nested masks -> disjoint ones: each pixel belongs only to the smallest mask covering it (ties: the first)."""
    exclusive, taken = {}, np.zeros(next(iter(masks.values())).shape, bool)
    for name in sorted(masks, key=lambda n: int(masks[n].sum())):
        exclusive[name] = masks[name].astype(bool) & ~taken
        taken |= exclusive[name]
    return {name: exclusive[name] for name in masks}


def pointing_game(heads: pd.DataFrame, manifest: pd.DataFrame, load_masks, grid: tuple[int, int], resize: int,
                  img_size: int, tolerance: float = TOLERANCE_AT_224) -> pd.DataFrame:
    """Where each image's top trait head peaks, scored on every ground-truth mask, as planted and as its exclusive
    region, with random baselines. `heads`: the heads tables of one rank or several (concatenated; an image's masks
    are read and scored once for all of them). One row per (rank, mask, region); see POINTING_COLUMNS:

    - hit_rate: the peak's patch overlaps the mask (strict patch hit); random_rate: the share of patches that do;
    - tolerance_hit_rate: the peak (the patch centre, in the eval crop) lies within `tolerance` pixels at 224 px
      (scaled with img_size) of the mask, the literature's pointing game; tolerance_random_rate: the share of patch
      centres that do;
    - centre_rate: the pixel under the peak lies in the mask (for exclusive regions: the region under the peak);
    - <rate>_low, <rate>_high: each rate's 95 % bootstrap interval over images (`taxotrait.intervals`).

    load_masks(mask_path) -> {name: bool array [H, W]}.
    """
    tops = pd.concat([top_trait_heads(rank_heads) for _, rank_heads in heads.groupby("rank", sort=False)],
                     ignore_index=True) if len(heads) else heads
    tops = tops.merge(manifest[["image_id", "mask_path"]], on="image_id")
    h, w = grid
    scored = {}  # mask file -> {(region, mask): per patch (hit, within tolerance, centre pixel inside)}
    rows = []
    for top in tops.itertuples(index=False):
        if top.mask_path not in scored:
            scored[top.mask_path] = patch_scores(load_masks(top.mask_path), grid, resize, img_size,
                                                 tolerance * img_size / 224)
        peak = int(top.peak_y * h) * w + int(top.peak_x * w)
        for (region, name), (hits, near, centre) in scored[top.mask_path].items():
            rows.append((top.rank, name, region, float(hits[peak]), float(hits.mean()), float(near[peak]),
                         float(near.mean()), float(centre[peak])))
    table = pd.DataFrame(rows, columns=["rank", "mask", "region", "hit", "random", "near", "near_random", "centre"])
    summary = mean_with_intervals(table, ["rank", "mask", "region"], POINTING_RATES)
    contrast = heads.groupby("rank", sort=False)["contrast"].first() if len(heads) else pd.Series(dtype=str)
    summary = summary.assign(contrast=summary["rank"].map(contrast).fillna(""))
    return summary[list(POINTING_COLUMNS)].astype(POINTING_COLUMNS)


def patch_scores(masks: dict[str, np.ndarray], grid: tuple[int, int], resize: int, img_size: int,
                 radius: float) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per (region, mask) of one image's masks, as planted and as exclusive regions, three bool arrays over the
    patches [h*w]: the patch overlaps the mask; its centre (in the eval crop) lies within `radius` crop pixels of it;
    the pixel under its centre is in it."""
    h, w = grid
    centres = (np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2) + 0.5) \
        * np.array([img_size / h, img_size / w])  # (row, col) of each patch centre in crop pixels
    cells = np.clip(centres.astype(int), 0, img_size - 1)
    height, width = next(iter(masks.values())).shape
    boxes = patch_boxes(grid, width, height, resize, img_size)
    scores = {}
    for region, regions in ((PLANTED, masks), (EXCLUSIVE, exclusive_masks(masks))):
        for name, mask in regions.items():
            inside = crop_mask(mask, resize, img_size)
            near = near_mask(inside, radius)[cells[:, 0], cells[:, 1]]
            scores[region, name] = (box_hits(mask, boxes), near, inside[cells[:, 0], cells[:, 1]])
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Ground truth in the model's input crop, and the localization metrics of whole saliency maps.
#
# Every map is compared with the ground truth in the pixels of the model's input crop (img_size x img_size): masks are
# resampled into it (nearest neighbour, through `crop_geometry`), part keypoints mapped into it (those falling
# outside the crop are not visible to the model and are dropped).

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


def load_ground_truth(manifest: pd.DataFrame, resize: int, img_size: int, parts: str | os.PathLike | None = None,
                      load_masks=None) -> dict[str, GroundTruth]:
    """Ground truth of the manifest's images in eval-crop pixels, by image_id: masks from the `mask_path` column
    (read with `load_masks`, default `taxotrait.synthetic.load_masks`) and/or keypoints of the CUB-style part
    annotations in folder `parts`. Images without any ground truth are left out."""
    truth: dict[str, GroundTruth] = {}
    if "mask_path" in manifest.columns:
        if load_masks is None:
            from .synthetic import load_masks
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


def argmax_pixels(saliency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) [N] of each map's maximum [N, H, W]; ties go to the first pixel in row-major order."""
    flat = np.asarray(saliency).reshape(len(saliency), -1).argmax(1)
    return flat // saliency.shape[-1], flat % saliency.shape[-1]


def pointing_hits(saliency: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Pointing game [N]: 1 when the map's maximum [N, H, W] lies inside the mask [N, H, W], else 0."""
    rows, cols = argmax_pixels(saliency)
    return np.asarray(masks)[np.arange(len(rows)), rows, cols].astype(np.float64)


def energy_shares(saliency: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Energy-based pointing game [N] (Wang et al., Score-CAM 2020): the share of the map's mass [N, H, W] (negative
    values clipped to 0) inside the mask; a uniform map scores the mask's area share; an all-zero map scores 0."""
    maps = np.clip(np.asarray(saliency, dtype=np.float64), 0, None).reshape(len(saliency), -1)
    inside = (maps * np.asarray(masks).reshape(len(maps), -1)).sum(1)
    total = maps.sum(1)
    return np.divide(inside, total, out=np.zeros_like(inside), where=total > 0)


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise each map [N, ...] to [0, 1] (as pytorch-grad-cam does its CAMs); a constant map becomes 1."""
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    scaled = np.divide(flat - low, high - low, out=np.ones_like(flat), where=high > low)
    return scaled.reshape(maps.shape)


def head_peak_parts(peaks: pd.DataFrame, truth: dict[str, GroundTruth], img_size: int) -> pd.Series:
    """The part each head's attention peak points to: peaks has image_id, peak_x, peak_y (patch centres in [0, 1]
    crop coordinates, as heads.parquet); '' where the image has no ground truth."""
    parts = []
    for image_id, x, y in zip(peaks["image_id"], peaks["peak_x"], peaks["peak_y"]):
        gt = truth.get(str(image_id))
        parts.append(gt.part_at(x * img_size, y * img_size) if gt else "")
    return pd.Series(parts, index=peaks.index, dtype="string")


def modal_parts(parts: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group of `by`: the most frequent part (ties: first by name), its share of the group's images, and the
    group's number of images. parts has `by`, image_id and part ('' = no ground truth: left out)."""
    parts = parts[parts["part"] != ""]
    counts = parts.groupby([*by, "part"], observed=True)["image_id"].nunique().rename("count").reset_index()
    totals = parts.groupby(by, observed=True)["image_id"].nunique().rename("n_images")
    top = counts.sort_values([*by, "count", "part"], ascending=[True] * len(by) + [False, True]).groupby(by).head(1)
    top = top.merge(totals, left_on=by, right_index=True)
    top["share"] = top["count"] / top["n_images"]
    return top[[*by, "part", "share", "n_images"]].reset_index(drop=True)


def part_consistency(parts: pd.DataFrame, threshold: float = 0.8) -> pd.DataFrame:
    """Part consistency in the style of Huang et al. (CVPR 2023), one row per (taxon, head).

    parts: one row per (taxon, head, image_id) with the part the head's peak points to on that image of the taxon.
    A head is consistent for its taxon when the same part (not the background) is hit on at least `threshold` of
    the taxon's images. Columns: taxon, head, part, share, n_images, consistent.
    """
    table = modal_parts(parts, ["taxon", "head"])
    table["consistent"] = (table["share"] >= threshold - 1e-12) & (table["part"] != BACKGROUND)
    return table
