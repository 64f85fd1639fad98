"""Where the trait heads point, scored against ground-truth masks (the demo's planted traits).

Pointing game: a head hits a mask when its attention peak's patch, mapped back from the model's input crop to the
original image, overlaps the mask. The random baseline is the share of patches that overlap it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

POINTING_COLUMNS = {"rank": "string", "mask": "string", "hit_rate": "float64", "random_rate": "float64",
                    "n_images": "int64"}


def crop_geometry(width: int, height: int, resize: int, img_size: int) -> tuple[float, float, float]:
    """(scale, left, top) of the eval transform: shorter side resized to `resize`, central `img_size` crop."""
    scale = resize / min(width, height)
    new_w, new_h = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    return scale, round((new_w - img_size) / 2), round((new_h - img_size) / 2)


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


def pointing_game(heads: pd.DataFrame, manifest: pd.DataFrame, load_masks, grid: tuple[int, int], resize: int,
                  img_size: int) -> pd.DataFrame:
    """Hit rate of each image's top trait head on every ground-truth mask, with the random-patch baseline.

    load_masks(mask_path) -> {name: bool array [H, W]}. One row per (rank, mask); see POINTING_COLUMNS.
    """
    tops = top_trait_heads(heads).merge(manifest[["image_id", "mask_path"]], on="image_id")
    h, w = grid
    rows = []
    for top in tops.itertuples(index=False):
        masks = load_masks(top.mask_path)
        height, width = next(iter(masks.values())).shape
        boxes = patch_boxes(grid, width, height, resize, img_size)
        peak = int(top.peak_y * h) * w + int(top.peak_x * w)
        for name, mask in masks.items():
            hits = box_hits(mask, boxes)
            rows.append((top.rank, name, float(hits[peak]), float(hits.mean())))
    table = pd.DataFrame(rows, columns=["rank", "mask", "hit", "random"])
    summary = table.groupby(["rank", "mask"], sort=False).agg(
        hit_rate=("hit", "mean"), random_rate=("random", "mean"), n_images=("hit", "size")).reset_index()
    return summary.astype(POINTING_COLUMNS)
