"""Datasets and taxonomies: read an image tree or a CSV manifest, validate against the taxonomy, write tables.

Outputs (see config/README.md): ``manifest.parquet`` (image_id, path, split, one column per rank, extra manifest
columns), ``classes.parquet`` (rank, class_index, taxon, parent, n_train, n_val, n_test) and ``rejects.parquet``
(path, image_id, reason).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps
from tqdm.auto import tqdm

log = logging.getLogger("taxotrait.dataset")

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class DatasetError(ValueError):
    """The dataset or taxonomy is inconsistent; the message names the file and row or taxon."""


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
        table[column] = [p if not p or os.path.isabs(p) else str(path.parent / p) for p in table[column]]
    return table


def check_image(path: str) -> str | None:
    """Why the image at `path` cannot be used, or None when it decodes."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            if min(image.size) < 8:
                return f"image too small ({image.size[0]}x{image.size[1]})"
    except FileNotFoundError:
        return "file not found"
    except Exception as err:  # truncated, not an image, decompression bomb
        return f"cannot decode: {type(err).__name__}: {err}"
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
    if "image_id" not in images.columns:
        images["image_id"] = [image_id_from_path(p) for p in images["path"]]
    duplicated = images[images["image_id"].duplicated(keep=False)]
    if len(duplicated):
        raise DatasetError(f"{source}: duplicate image_id {duplicated['image_id'].iloc[0]!r} "
                           f"({list(duplicated['path'].iloc[:2])})")

    reasons = [check_image(p) for p in tqdm(images["path"], desc="checking images", disable=not progress)]
    bad = pd.Series([r is not None for r in reasons], index=images.index)
    rejects = pd.DataFrame({"path": images["path"][bad], "image_id": images["image_id"][bad],
                            "reason": [r for r in reasons if r is not None]}).reset_index(drop=True)
    if bad.mean() > max_reject_fraction:
        examples = "; ".join(f"{p}: {r}" for p, r in rejects[["path", "reason"]].head(3).itertuples(index=False))
        raise DatasetError(f"{source}: {int(bad.sum())} of {len(images)} images rejected, more than the allowed "
                           f"{max_reject_fraction:.1%} (prepare.max_reject_fraction), e.g. {examples}")
    manifest = images[~bad].reset_index(drop=True)
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
    manifest, classes, rejects = prepare_dataset(images, taxonomy, ranks, source, data.get("max_reject_fraction", 0.01))
    for table, key in ((manifest, "manifest"), (classes, "classes"), (rejects, "rejects")):
        table.to_parquet(outputs[key], index=False)
    log.info("%d images, %d rejected; classes per rank: %s", len(manifest), len(rejects),
             classes.groupby("rank", sort=False).size().to_dict())
