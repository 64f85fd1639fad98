"""Where the trait heads point, scored against ground-truth masks (the demo's planted traits).

Pointing game: a head hits a mask when its attention peak's patch, mapped back from the model's input crop to the
original image, overlaps the mask. The random baseline is the share of patches that overlap it. Masks may nest (the
demo's body contains its stripe region and marks), so each is scored twice: as planted, and as its exclusive region
(each pixel given to the smallest mask covering it), where a peak on the stripes no longer also counts for the body.

Below, the metrics that score whole saliency maps against the ground truth in the model's input crop (masks, or
CUB-style part keypoints: `taxotrait.groundtruth`): pointing game, energy-based pointing game, the part a head points to, part
consistency (used by `taxotrait.evaluation` and the named traits of `taxotrait.traits`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .groundtruth import BACKGROUND, GroundTruth, crop_geometry, crop_mask, exclusive_masks, near_mask
from .intervals import mean_with_intervals

POINTING_RATES = {"hit_rate": "hit", "random_rate": "random", "tolerance_hit_rate": "near",
                  "tolerance_random_rate": "near_random", "centre_rate": "centre"}  # rate: per-image column
POINTING_COLUMNS = {"rank": "string", "mask": "string", "region": "string", "hit_rate": "float64",
                    "random_rate": "float64", "n_images": "int64", "tolerance_hit_rate": "float64",
                    "tolerance_random_rate": "float64", "centre_rate": "float64", "contrast": "string",
                    **{f"{rate}_{end}": "float64" for rate in POINTING_RATES for end in ("low", "high")}}
TOLERANCE_AT_224 = 15.0  # the pointing game's standard tolerance, in pixels of a 224 px input
PLANTED, EXCLUSIVE = "planted", "exclusive"  # the values of `region`


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
# The localization metrics of whole saliency maps, against the ground truth in the pixels of the model's input crop
# (img_size x img_size; `taxotrait.groundtruth`).

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
