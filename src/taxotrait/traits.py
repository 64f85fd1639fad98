"""Trait tables from greedy head masking, and small pandas helpers to load and query them.

``traits.parquet`` (per rank): one row per (taxon, trait head). ``hierarchy_traits.parquet``: for each species, its
traits at every rank measured on that species' own images. Columns are documented in config/README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

TRAIT_COLUMNS = ["n_images", "frequency", "mean_importance", "peak_x", "peak_y", "spread"]


def aggregate_traits(heads: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """One row per (`by`..., head) that is a trait head on at least one image of the group.

    n_images: images on which the head is a trait head; frequency: that share of the group's (correctly classified)
    images; mean_importance: mean score drop when the head is blurred; peak_x, peak_y, spread: means over those
    images of the head's attention peak (normalised image coordinates) and spread.
    """
    heads = heads.assign(importance=heads["score_before_removal"] - heads["score_after_removal"])
    group_sizes = heads.groupby(by)["image_id"].nunique().rename("group_images")
    traits = heads[heads["is_trait_head"]].groupby([*by, "head"]).agg(
        n_images=("image_id", "nunique"),
        mean_importance=("importance", "mean"),
        peak_x=("peak_x", "mean"),
        peak_y=("peak_y", "mean"),
        spread=("spread", "mean"),
    ).reset_index()
    traits = traits.merge(group_sizes, left_on=by, right_index=True)
    traits["frequency"] = traits["n_images"] / traits["group_images"]
    traits = traits.sort_values([*by, "frequency", "mean_importance"], ascending=[True] * len(by) + [False, False])
    columns = [*by, "head", *TRAIT_COLUMNS]
    return traits[columns].astype({"n_images": "int64", "head": "int64"}).reset_index(drop=True)


def rank_traits(heads: pd.DataFrame) -> pd.DataFrame:
    """traits.parquet of one rank: rows per (rank, taxon, head)."""
    return aggregate_traits(heads, ["rank", "taxon"])


def hierarchy_traits(heads_by_rank: list[pd.DataFrame], manifest: pd.DataFrame, ranks: list[str]) -> pd.DataFrame:
    """hierarchy_traits.parquet: for each species and rank, the traits of the species' ancestor taxon at that rank
    measured on the species' own images (coarse to fine)."""
    species_of = manifest[["image_id", ranks[-1]]].rename(columns={ranks[-1]: "species"})
    frames = [aggregate_traits(heads.merge(species_of, on="image_id"), ["species", "rank", "taxon"])
              for heads in heads_by_rank]
    table = pd.concat(frames, ignore_index=True)
    order = {rank: depth for depth, rank in enumerate(ranks)}
    table = table.assign(rank_depth=table["rank"].map(order)).sort_values(
        ["species", "rank_depth", "frequency"], ascending=[True, True, False])
    return table.drop(columns="rank_depth").reset_index(drop=True)


def load_traits(results: str | os.PathLike, rank: str | None = None) -> pd.DataFrame:
    """traits.parquet of one rank, or of every rank found under a dataset's results folder."""
    results = Path(results)
    paths = [results / rank / "traits.parquet"] if rank else sorted(results.glob("*/traits.parquet"))
    if not paths or not all(p.is_file() for p in paths):
        raise FileNotFoundError(f"no traits.parquet under {results}" + (f"/{rank}" if rank else ""))
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def load_hierarchy(results: str | os.PathLike, species: str | None = None) -> pd.DataFrame:
    """hierarchy_traits.parquet of a dataset, optionally for one species."""
    table = pd.read_parquet(Path(results) / "hierarchy_traits.parquet")
    return table if species is None else table[table["species"] == species].reset_index(drop=True)


def top_traits(traits: pd.DataFrame, taxon: str, n: int = 3) -> pd.DataFrame:
    """The `n` most frequent trait heads of `taxon` (ties broken by importance)."""
    rows = traits[traits["taxon"] == taxon]
    return rows.sort_values(["frequency", "mean_importance"], ascending=False).head(n).reset_index(drop=True)


def write_rank_traits(heads_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """heads.parquet of one rank -> traits.parquet."""
    rank_traits(pd.read_parquet(heads_path)).to_parquet(out_path, index=False)


def write_hierarchy(heads_paths: list, manifest_path: str | os.PathLike, ranks: list[str],
                    out_path: str | os.PathLike) -> None:
    """Every rank's heads.parquet + the manifest -> hierarchy_traits.parquet."""
    heads = [pd.read_parquet(path) for path in heads_paths]
    hierarchy_traits(heads, pd.read_parquet(manifest_path), ranks).to_parquet(out_path, index=False)
