"""Trait tables from greedy head masking, and small pandas helpers to load and query them.

``traits.parquet`` (per rank): one row per (taxon, trait head). ``hierarchy_traits.parquet``: for each species, its
traits at every rank measured on that species' own images. Columns are documented in config/README.md.

Named traits: where the images have ground truth (masks, e.g. the demo's planted traits, or CUB-style part
keypoints; `taxotrait.groundtruth.load_ground_truth`), each trait gets the part its head's attention peak points to
on most of the images where it is a trait head (`part`) and that share of those images (`part_share`), so a trait
table reads "Scott Oriole: head 1: crown (92%), head 11: belly (85%)" (`describe_traits`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .groundtruth import load_ground_truth
from .io import empty_table
from .localization import head_peak_parts, modal_parts

TRAIT_COLUMNS = ["n_images", "frequency", "mean_importance", "peak_x", "peak_y", "spread", "part", "part_share"]
PROMPT_COLUMNS = ["prompt", "contrast"]  # whose prompt the head is (the taxon's own or a sibling's), and the contrast


def aggregate_traits(heads: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """One row per (`by`..., prompt, head) that is a trait head on at least one image of the group.

    n_images: images on which the head is a trait head; frequency: that share of the group's (correctly classified)
    images; mean_importance: mean drop of the margin over the best rival when the head is blurred; peak_x, peak_y,
    spread: means over those images of the head's attention peak (normalised image coordinates) and spread; part,
    part_share: where `heads` has a `part` column (`name_heads`), the part the head points to on most of those
    images and that share of them ('' and NaN without ground truth); prompt: the taxon whose prompt the head is
    (the group's own, or a sibling's under contrast 'siblings'); contrast.
    """
    keys = [*by, "prompt", "head"]
    if not heads["is_trait_head"].any():  # e.g. no correctly classified image: an empty table of the same columns
        types = {**{c: "string" for c in [*by, *PROMPT_COLUMNS]}, "head": "int64", "n_images": "int64",
                 "part": "string"}
        return empty_table({c: types.get(c, "float64") for c in [*by, "head", *TRAIT_COLUMNS, *PROMPT_COLUMNS]})
    heads = heads.assign(importance=heads["margin_before_removal"] - heads["margin_after_removal"])
    group_sizes = heads.groupby(by)["image_id"].nunique().rename("group_images")
    traits = heads[heads["is_trait_head"]].groupby(keys).agg(
        n_images=("image_id", "nunique"),
        mean_importance=("importance", "mean"),
        peak_x=("peak_x", "mean"),
        peak_y=("peak_y", "mean"),
        spread=("spread", "mean"),
        contrast=("contrast", "first"),
    ).reset_index()
    traits = traits.merge(group_sizes, left_on=by, right_index=True)
    traits["frequency"] = traits["n_images"] / traits["group_images"]
    traits["part"], traits["part_share"] = "", np.nan
    if "part" in heads.columns:
        named = modal_parts(heads.loc[heads["is_trait_head"], [*keys, "image_id", "part"]], keys)
        traits = traits.drop(columns=["part", "part_share"]).merge(
            named.rename(columns={"share": "part_share"})[[*keys, "part", "part_share"]], on=keys, how="left")
        traits["part"] = traits["part"].fillna("")
    traits = traits.sort_values([*by, "frequency", "mean_importance"], ascending=[True] * len(by) + [False, False])
    columns = [*by, "head", *TRAIT_COLUMNS, *PROMPT_COLUMNS]
    return traits[columns].astype({"n_images": "int64", "head": "int64", "part": "string", "part_share": "float64",
                                   "prompt": "string", "contrast": "string"}).reset_index(drop=True)


def name_heads(heads: pd.DataFrame, manifest: pd.DataFrame, resize: int, img_size: int,
               parts: str | os.PathLike | None = None) -> pd.DataFrame:
    """heads.parquet rows with a `part` column: for trait heads, the part their attention peak points to (the most
    specific mask containing it, or the nearest visible part keypoint; `taxotrait.localization`); '' for other
    rows and for images without ground truth."""
    heads = heads.assign(part=pd.Series("", index=heads.index, dtype="string"))
    if "mask_path" not in manifest.columns and not parts:
        return heads
    truth = load_ground_truth(manifest[manifest["image_id"].isin(heads["image_id"])], resize, img_size, parts)
    trait = heads["is_trait_head"]
    heads.loc[trait, "part"] = head_peak_parts(heads.loc[trait], truth, img_size)
    return heads


def image_region(x: float, y: float) -> str:
    """Where a point of normalised image coordinates ([0, 1], y down) lies, in words: "upper left", "centre",
    "lower right", ... (thirds of the image)."""
    vertical = ("upper ", "", "lower ")[min(int(y * 3), 2)]
    horizontal = ("left", "centre", "right")[min(int(x * 3), 2)]
    return "centre" if (vertical, horizontal) == ("", "centre") else vertical + horizontal


def describe_traits(traits: pd.DataFrame, taxon: str, n: int | None = None) -> str:
    """One line naming a taxon's trait heads, most frequent first, e.g. "Scott Oriole: head 1: crown (92%), head 11:
    belly (85%)" (the part and the share of images where the head points to it), or, without ground truth, where
    the head looks: "head 1: upper left of the image, spread 0.12 (92% of images)"."""
    rows = top_traits(traits, taxon, n=n or len(traits))
    return f"{taxon}: " + ", ".join(_trait_cell(r) for r in rows.itertuples(index=False))


def _trait_cell(row) -> str:
    """'head 3: species (92%)', 'head 2 of Species_B's prompt: ...' or, without ground truth, 'head 1: upper left
    of the image, spread 0.12 (92% of images)'."""
    head = f"head {row.head}" + (f" of {row.prompt}'s prompt" if row.prompt != row.taxon else "")
    if isinstance(row.part, str) and row.part:
        return f"{head}: {row.part} ({row.part_share:.0%})"
    return f"{head}: {image_region(row.peak_x, row.peak_y)} of the image, spread {row.spread:.2f} " \
           f"({row.frequency:.0%} of images)"


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


# ------------------------------------------------------------------------------------------------- the key
ROOT = "(root)"  # the node above the top rank
KEY_COLUMNS = ["node_rank", "node", "n_children"]  # before the columns of traits.parquet


def key_table(traits_by_rank: list[pd.DataFrame], classes: pd.DataFrame, ranks: list[str]) -> pd.DataFrame:
    """key.parquet: one row per (internal node, child, trait head): the traits.parquet rows of every rank, each under
    the node it forks from (`node`: the child's parent, `ROOT` above the top rank; `node_rank`: its rank, '' for the
    root; `n_children`: the node's children, 1 for a monotypic taxon, which has no rows: nothing tells it apart)."""
    children = classes.assign(parent=classes["parent"].fillna("").astype(str))
    sizes = children.groupby(["rank", "parent"])["taxon"].transform("size")
    node_of = dict(zip(zip(children["rank"], children["taxon"]), zip(children["parent"], sizes)))
    frames = []
    for depth, (rank, traits) in enumerate(zip(ranks, traits_by_rank)):
        nodes = [node_of[(rank, taxon)] for taxon in traits["taxon"]]
        frames.append(traits.assign(node_rank=ranks[depth - 1] if depth else "",
                                    node=[node or ROOT for node, _ in nodes],
                                    n_children=np.array([n for _, n in nodes], dtype=np.int64)))
    columns = [*KEY_COLUMNS, *traits_by_rank[0].columns]
    return pd.concat(frames, ignore_index=True)[columns].astype({"node_rank": "string", "node": "string",
                                                                 "n_children": "int64"})


def key_markdown(key: pd.DataFrame, classes: pd.DataFrame, ranks: list[str], heads_per_child: int = 2) -> str:
    """key.md: the key as couplets, coarse to fine, one section per fork ("Familia_A1 → Genus_A1a vs Genus_A1b"),
    each child with its top trait heads; monotypic taxa are listed as such."""
    contrast = ", ".join(sorted(set(key["contrast"].dropna()))) or "none"
    lines = [f"# Key to the taxa (contrast: {contrast})", "",
             "At each fork, each child's most frequent trait heads on its correctly classified images: the head (and "
             "whose prompt it is, when a sibling's prompt decides), where it points (the part and the share of "
             "those images where it points there, with ground truth) and the share of images on which it is a trait "
             "head.", ""]
    monotypic = []
    for depth, rank in enumerate(ranks):
        rows = classes[classes["rank"] == rank].assign(parent=lambda t: t["parent"].fillna("").astype(str))
        for parent, group in rows.groupby("parent", sort=False):
            node = parent or ROOT
            names = group.sort_values("class_index")["taxon"].tolist()
            if len(names) == 1:
                monotypic.append(f"- {node} → {names[0]} ({rank}): monotypic, nothing to tell it from at this fork; "
                                 "its traits come from the forks above it")
                continue
            lines += [f"## {node} → {' vs '.join(names)} ({rank})", ""]
            for name in names:
                child = key[(key["rank"] == rank) & (key["taxon"] == name)]
                child = child.sort_values(["frequency", "mean_importance"], ascending=False).head(heads_per_child)
                cells = [_key_cell(r) for r in child.itertuples(index=False)]
                lines.append(f"- **{name}**: " + ("; ".join(cells) if cells else "no correctly classified image"))
            lines.append("")
    if monotypic:
        lines += ["## Monotypic taxa", "", *monotypic, ""]
    return "\n".join(lines)


def _key_cell(row) -> str:
    """'head 3, species region (95 %), 92 % of images' (whose prompt, when not the child's own)."""
    head = f"head {row.head}" + (f" of {row.prompt}'s prompt" if row.prompt != row.taxon else "")
    where = (f", {row.part} region ({row.part_share:.0%})" if isinstance(row.part, str) and row.part
             else f", peak at x {row.peak_x:.2f}, y {row.peak_y:.2f}, spread {row.spread:.2f}")
    return f"{head}{where}, {row.frequency:.0%} of images"


def load_key(results: str | os.PathLike, node: str | None = None) -> pd.DataFrame:
    """key.parquet of a dataset's results folder, optionally the rows of one fork (`node`: the parent taxon, or
    `ROOT`)."""
    path = Path(results) / "key.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no key.parquet in {results}")
    table = pd.read_parquet(path)
    return table if node is None else table[table["node"] == node].reset_index(drop=True)
