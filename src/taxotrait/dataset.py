"""Datasets and taxonomies: read an image tree or a CSV manifest, validate against the taxonomy, write tables.

Outputs (see config/README.md): ``manifest.parquet`` (image_id, path, split, one column per rank, extra manifest
columns), ``classes.parquet`` (rank, class_index, taxon, parent, n_train, n_val, n_test) and ``rejects.parquet``
(path, image_id, reason).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .runner import write_parquet

log = logging.getLogger("taxotrait.dataset")

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MIN_IMAGE_SIDE = 8  # pixels; smaller images are rejected, larger ones are resized (up or down) by the transform
ALPHA_BACKGROUND = (255, 255, 255)  # transparent images are composited onto white, as an image viewer shows them
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 'I' (32-bit integer) is read as 16-bit too
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class DatasetError(ValueError):
    """The dataset or taxonomy is inconsistent; the message names the file and row or taxon."""


class ImageError(ValueError):
    """An image file cannot be used. `reason` is what rejects.parquet records; the message also names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode.

    - 16-bit grey ('I;16*', and 'I') is scaled to 8 bits (value / 257, rounded: 65535 -> 255), not clipped;
    - transparency (RGBA, LA, PA, premultiplied modes, palette or grey images with a transparent colour) is
      composited onto white (`ALPHA_BACKGROUND`), so transparent pixels never show their hidden colour;
    - CMYK, palette, grey, 1-bit and YCbCr images use PIL's conversion (CMYK without colour management);
    - floating-point ('F') and other modes without a conversion to RGB raise ValueError.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise ValueError("floating-point images are not supported; save them as 8- or 16-bit")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as upright 8-bit RGB: the one place where a file becomes RGB (`taxotrait.data.load_image`
    and `check_image` both use it).

    The EXIF orientation is applied (`ImageOps.exif_transpose`), then `to_rgb`. Raises ImageError, whose reason is
    one of: file not found, empty file, not an image, too large (more pixels than PIL's decompression-bomb limit
    `Image.MAX_IMAGE_PIXELS`, set by data.max_image_pixels), cannot decode (truncated or corrupt), unsupported image
    mode, too small (shorter side below MIN_IMAGE_SIDE).
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit is a rejection
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)  # decodes the pixels
    except UnidentifiedImageError:
        raise ImageError(path, "not an image: PIL cannot identify its format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(path, f"too large: {err} (limit: data.max_image_pixels)") from None
    except Exception as err:  # truncated file, corrupt data, broken EXIF
        raise ImageError(path, f"cannot decode (truncated or corrupt): {type(err).__name__}: {err}") from None
    try:
        rgb = to_rgb(image)
    except Exception as err:
        raise ImageError(path, f"unsupported image mode {image.mode}: {err}") from None
    if min(rgb.size) < MIN_IMAGE_SIDE:
        raise ImageError(path, f"too small: {rgb.size[0]}x{rgb.size[1]} pixels (the shorter side must be at least "
                               f"{MIN_IMAGE_SIDE})")
    return rgb


def read_taxonomy(path: str | os.PathLike, ranks: list[str]) -> pd.DataFrame:
    """Read a taxonomy table (one row per species, one column per rank) and check it is a tree."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"taxonomy table not found: {path}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [rank for rank in ranks if rank not in table.columns]
    if missing:
        raise DatasetError(f"{path}: rank column(s) {missing} missing; columns are {list(table.columns)}")
    table = table[ranks].apply(lambda column: column.str.strip())
    for rank in ranks:
        empty = table.index[table[rank] == ""]
        if len(empty):
            raise DatasetError(f"{path}: empty {rank} in row(s) {[int(i) + 2 for i in empty[:5]]} (line numbers)")
    table = table.drop_duplicates().reset_index(drop=True)
    conflicting = table[table[ranks[-1]].duplicated(keep=False)]
    if len(conflicting):
        raise DatasetError(f"{path}: {ranks[-1]} {conflicting[ranks[-1]].iloc[0]!r} has rows with different ranks")
    check_tree(table, ranks, str(path))
    return table


def check_tree(table: pd.DataFrame, ranks: list[str], source: str) -> None:
    """Every taxon must have exactly one parent, and no name may be used at two ranks."""
    for parent_rank, rank in zip(ranks, ranks[1:]):
        parents = table.groupby(rank)[parent_rank].unique()
        several = parents[parents.map(len) > 1]
        if len(several):
            taxon = several.index[0]
            raise DatasetError(f"{source}: {rank} {taxon!r} has several parents at rank {parent_rank}: "
                               f"{sorted(several.iloc[0])}")
    seen: dict[str, str] = {}
    for rank in ranks:
        for taxon in table[rank].unique():
            if taxon in seen and seen[taxon] != rank:
                raise DatasetError(f"{source}: name {taxon!r} is used at ranks {seen[taxon]} and {rank}")
            seen[taxon] = rank


def scan_image_tree(root: str | os.PathLike) -> pd.DataFrame:
    """Images laid out as ``<root>/<split>/<species>/<image>``: columns path, split, species."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    rows = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if split_dir.name not in SPLITS:
            raise DatasetError(f"{split_dir}: split folders must be named {SPLITS}")
        for species_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for image in sorted(species_dir.iterdir()):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append((str(image), split_dir.name, species_dir.name))
    if not rows:
        raise DatasetError(f"{root}: no images found under <split>/<species>/")
    return pd.DataFrame(rows, columns=["path", "split", "species"])


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV manifest with columns path, split and species (or the rank columns); relative paths (in `path` and any
    `*_path` column) are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("path", "split"):
        if column not in table.columns:
            raise DatasetError(f"{path}: required column {column!r} missing; columns are {list(table.columns)}")
    bad_split = table.index[~table["split"].isin(SPLITS)]
    if len(bad_split):
        row = int(bad_split[0])
        raise DatasetError(f"{path}: row {row + 2} has split {table.loc[row, 'split']!r}; allowed: {SPLITS}")
    for column in [c for c in table.columns if c == "path" or c.endswith("_path")]:
        for row, value in enumerate(table[column]):
            if value and not os.path.isabs(value) and os.path.normpath(value).split(os.sep)[0] == os.pardir:
                raise DatasetError(f"{path}: row {row + 2} {column} {value!r} leaves the manifest's folder "
                                   f"{path.parent}; relative paths must stay inside it (use an absolute path)")
        table[column] = [p if not p or os.path.isabs(p) else str(path.parent / p) for p in table[column]]
    return table


def check_image(path: str) -> str | None:
    """Why the image at `path` cannot be used (the reason recorded in rejects.parquet), or None: `read_image`
    decides."""
    try:
        read_image(path)
    except ImageError as err:
        return err.reason
    return None


def prepare_dataset(
    images: pd.DataFrame,
    taxonomy: pd.DataFrame | None,
    ranks: list[str],
    source: str,
    max_reject_fraction: float = 0.01,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Validate images against the taxonomy: (manifest, classes, rejects) tables.

    `images` has path and split plus either the species column or every rank column; other columns are kept.
    """
    species = ranks[-1]
    images = images.copy()
    if species not in images.columns:
        raise DatasetError(f"{source}: no {species!r} column")
    if taxonomy is None:
        missing = [rank for rank in ranks if rank not in images.columns]
        if missing:
            raise DatasetError(f"{source}: no taxonomy table given and rank column(s) {missing} missing")
        taxonomy = images[ranks].drop_duplicates().reset_index(drop=True)
        check_tree(taxonomy, ranks, source)
    else:
        given = [rank for rank in ranks[:-1] if rank in images.columns]
        images = images.drop(columns=given).merge(taxonomy, on=species, how="left", validate="many_to_one")
        unknown = images[images[ranks[0]].isna()][species].unique()
        if len(unknown):
            raise DatasetError(f"{source}: {len(unknown)} {species} without a taxonomy row, e.g. {sorted(unknown)[:5]}")
    if images.empty:
        raise DatasetError(f"{source}: no images listed")
    same_file = images["path"].map(os.path.normpath)
    duplicated = same_file[same_file.duplicated(keep=False)]
    if len(duplicated):
        rows = [int(i) + 2 for i in duplicated.index[duplicated == duplicated.iloc[0]]]
        raise DatasetError(f"{source}: image {duplicated.iloc[0]!r} is listed more than once (rows {rows}, line "
                           "numbers of a manifest)")
    derived = "image_id" not in images.columns
    if derived:
        images["image_id"] = [image_id_from_path(p) for p in images["path"]]
    duplicated = images[images["image_id"].duplicated(keep=False)]
    if len(duplicated):
        hint = " (ids are made from split/species/name of the path: add an image_id column)" if derived else ""
        raise DatasetError(f"{source}: duplicate image_id {duplicated['image_id'].iloc[0]!r} "
                           f"({list(duplicated['path'].iloc[:2])}){hint}")

    reasons = [check_image(p) for p in tqdm(images["path"], desc="checking images", disable=not progress)]
    bad = pd.Series([r is not None for r in reasons], index=images.index)
    rejects = pd.DataFrame({"path": images["path"][bad], "image_id": images["image_id"][bad],
                            "reason": [r for r in reasons if r is not None]}).reset_index(drop=True)
    if bad.mean() > max_reject_fraction:
        examples = "; ".join(f"{p}: {r}" for p, r in rejects[["path", "reason"]].head(3).itertuples(index=False))
        raise DatasetError(f"{source}: {int(bad.sum())} of {len(images)} images rejected, more than the allowed "
                           f"{max_reject_fraction:.1%} (data.max_reject_fraction), e.g. {examples}")
    manifest = images[~bad].reset_index(drop=True)
    if manifest.empty:
        raise DatasetError(f"{source}: none of the {len(images)} images can be used, e.g. "
                           f"{rejects['path'].iloc[0]}: {rejects['reason'].iloc[0]}")
    extra = [c for c in manifest.columns if c not in ("image_id", "path", "split", *ranks)]
    manifest = manifest[["image_id", "path", "split", *ranks, *extra]]
    classes = class_table(manifest, ranks, source)
    return manifest, classes, rejects


def image_id_from_path(path: str) -> str:
    """A readable id: the image's split/species/name without extension."""
    parts = Path(path).with_suffix("").parts
    return "/".join(parts[-3:])


def class_table(manifest: pd.DataFrame, ranks: list[str], source: str) -> pd.DataFrame:
    """One row per (rank, taxon): class_index (sorted names), parent and image counts per split."""
    tables = []
    for depth, rank in enumerate(ranks):
        counts = pd.crosstab(manifest[rank], manifest["split"]).reindex(columns=list(SPLITS), fill_value=0)
        untrained = counts.index[counts["train"] == 0]
        if len(untrained):
            raise DatasetError(f"{source}: {rank} {untrained[0]!r} has no training images")
        parents = manifest.groupby(rank)[ranks[depth - 1]].first() if depth else pd.Series("", index=counts.index)
        table = pd.DataFrame({
            "rank": rank,
            "class_index": range(len(counts)),
            "taxon": counts.index.astype(str),
            "parent": parents.reindex(counts.index).values,
            **{f"n_{split}": counts[split].values.astype("int64") for split in SPLITS},
        })
        tables.append(table)
    classes = pd.concat(tables, ignore_index=True)
    classes["class_index"] = classes["class_index"].astype("int64")
    return classes


def class_names(classes: pd.DataFrame, rank: str) -> list[str]:
    """Class names of `rank` in class-index order."""
    return classes[classes["rank"] == rank].sort_values("class_index")["taxon"].tolist()


def class_parents(classes: pd.DataFrame, rank: str) -> list[str]:
    """Parent taxon of each class of `rank` in class-index order ('' at the top rank: one group of siblings)."""
    return classes[classes["rank"] == rank].sort_values("class_index")["parent"].fillna("").astype(str).tolist()


def labels(manifest: pd.DataFrame, classes: pd.DataFrame, rank: str) -> pd.Series:
    """Class index of every manifest row at `rank`."""
    index = {taxon: i for i, taxon in enumerate(class_names(classes, rank))}
    return manifest[rank].map(index).astype("int64")


def prepare_files(inputs: dict, outputs: dict, config: dict) -> None:
    """Image tree or manifest + taxonomy -> manifest, classes and rejects tables."""
    data, ranks = config["data"], config["ranks"]
    if data.get("images"):
        images, source = scan_image_tree(data["images"]), data["images"]
        images = images.rename(columns={"species": ranks[-1]})
    else:
        images, source = read_manifest(inputs["manifest"]), inputs["manifest"]
    taxonomy = read_taxonomy(inputs["taxonomy"], ranks) if inputs.get("taxonomy") else None
    if inputs.get("tree"):
        from .taxonomy import check_leaves, tree_taxonomy

        taxonomy = tree_taxonomy(inputs["tree"], ranks)
        check_leaves(taxonomy, images[ranks[-1]], str(inputs["tree"]))
    manifest, classes, rejects = prepare_dataset(images, taxonomy, ranks, source, data.get("max_reject_fraction", 0.01))
    for table, key in ((manifest, "manifest"), (classes, "classes"), (rejects, "rejects")):
        write_parquet(table, outputs[key])
    log.info("%d images, %d rejected; classes per rank: %s", len(manifest), len(rejects),
             classes.groupby("rank", sort=False).size().to_dict())
