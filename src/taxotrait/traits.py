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
from .intervals import difference_interval
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
    """heads.parquet rows with a `part` column: for trait heads and every head of an image's own prompt (where the
    key places a trait), the part their attention peak points to (the most specific mask containing it, or the
    nearest visible part keypoint; `taxotrait.localization`); '' for other rows and for images without ground
    truth."""
    heads = heads.assign(part=pd.Series("", index=heads.index, dtype="string"))
    if "mask_path" not in manifest.columns and not parts:
        return heads
    truth = load_ground_truth(manifest[manifest["image_id"].isin(heads["image_id"])], resize, img_size, parts)
    named = heads["is_trait_head"] | (heads["prompt"] == heads["taxon"])
    heads.loc[named, "part"] = head_peak_parts(heads.loc[named], truth, img_size)
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
    head = _head_label(row)
    if isinstance(row.part, str) and row.part:
        return f"{head}: {row.part} ({row.part_share:.0%})"
    return f"{head}: {image_region(row.peak_x, row.peak_y)} of the image, spread {row.spread:.2f} " \
           f"({row.frequency:.0%} of images)"


def _head_label(row) -> str:
    """'head 3', or 'head 2 of Species_B's prompt' for a head of a sibling's prompt (a traits or key row)."""
    return f"head {row.head}" + (f" of {row.prompt}'s prompt" if row.prompt != row.taxon else "")


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
KEY_COLUMNS = ["node_rank", "node", "n_children"]  # before the columns of a rank's key entries
KEY_ENTRY_COLUMNS = {
    "rank": "string", "taxon": "string", "entry": "int64", "evidence": "string", "prompt": "string", "head": "int64",
    "separation": "float64", "separation_low": "float64", "separation_high": "float64",
    "strength_with": "float64", "strength_without": "float64", "n_images_with": "int64", "n_images_without": "int64",
    "frequency": "float64", "peak_x": "float64", "peak_y": "float64", "spread": "float64", "part": "string",
    "part_share": "float64", "contrast": "string",
}


def _drop_stats(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group of `by`: images, mean and variance of `score_drop_alone` (what the head adds to its prompt's
    score)."""
    return rows.groupby(by, observed=True)["score_drop_alone"].agg(n="count", mean="mean", var="var").reset_index()


def key_entries(heads: pd.DataFrame) -> pd.DataFrame:
    """A rank's key entries (`<rank>/key.parquet`): for each taxon, the heads that tell it from its siblings, best
    first (`entry` 1, 2, ...), from heads.parquet rows (named: `name_heads`).

    A head fires with strength `score_drop_alone` (what it adds to its prompt's score on an image). Evidence
    `present`: a head of the taxon's own prompt, firing on the taxon's images (`strength_with`) more than on its
    siblings' images where that prompt was a masking candidate (`strength_without`). Evidence `absent`: a head of a
    sibling's prompt, firing on the sibling's images (`strength_with`) more than on the taxon's (`strength_without`):
    the trait the sibling has and the taxon lacks ("mark yellow / mark not yellow"). An entry is placed where its head
    fires on the images that have the trait (`peak_x`, `peak_y`, `spread`, `part`, `part_share` over the prompt's
    own taxon's images), never where it wanders on images that lack it. Entries are ranked by `separation` =
    strength_with - strength_without and kept only when its 95 % interval (normal, unequal variances) lies above 0:
    a head that fires alike on both sides (a trait every sibling has) is never an entry; at most as many entries per
    taxon as the model has heads. Where no sibling's image was scored with the taxon's prompt and vice versa (under
    contrast 'rank', or `masking.sibling_prompts: 0`), the taxon's own trait heads are its entries, `present` with
    no separation, ranked by `frequency` (the share of the taxon's images on which the head is a trait head)."""
    if heads.empty:
        return empty_table(KEY_ENTRY_COLUMNS)
    if "part" not in heads.columns:  # not named: no ground truth
        heads = heads.assign(part=pd.Series("", index=heads.index, dtype="string"))
    num_heads = int(heads["head"].max()) + 1
    images = heads.groupby("taxon", observed=True)["image_id"].nunique().rename("taxon_images")
    frequency = heads.groupby(["taxon", "prompt", "head"], observed=True)["is_trait_head"].sum().rename("n_trait")
    keys = ["prompt", "head"]
    own_rows = heads[heads["prompt"] == heads["taxon"]]
    owner = _drop_stats(own_rows, keys).rename(columns={"n": "n_with", "mean": "with", "var": "var_with"})
    placement = own_rows.groupby(keys, observed=True)[["peak_x", "peak_y", "spread"]].mean().reset_index()
    named = modal_parts(own_rows[[*keys, "image_id", "part"]], keys)[[*keys, "part", "share"]]
    owner = owner.merge(placement, on=keys).merge(named.rename(columns={"share": "part_share"}), on=keys, how="left")
    cross = heads[heads["prompt"] != heads["taxon"]]
    # present: the taxon's own heads against its prompt on the siblings' images
    without_own = _drop_stats(cross, keys).assign(taxon=lambda t: t["prompt"])
    # absent: a sibling's heads against that prompt on the taxon's images
    without_sibling = _drop_stats(cross, ["taxon", "prompt", "head"])
    sides = pd.concat([without_own.assign(evidence="present"), without_sibling.assign(evidence="absent")],
                      ignore_index=True).rename(columns={"n": "n_without", "mean": "without", "var": "var_without"})
    entries = sides.merge(owner, on=keys)
    entries["separation"] = entries["with"] - entries["without"]
    entries["separation_low"], entries["separation_high"] = difference_interval(
        entries["with"], entries["var_with"], entries["n_with"], entries["without"], entries["var_without"],
        entries["n_without"])
    entries = entries[entries["separation_low"] > 0]
    measured = set(sides["taxon"])
    unmeasured = owner[~owner["prompt"].isin(measured)].assign(taxon=lambda t: t["prompt"], evidence="present",
                                                                n_without=0)
    entries = pd.concat([entries, unmeasured], ignore_index=True)
    entries = entries.merge(frequency.reset_index(), on=["taxon", "prompt", "head"], how="left").merge(
        images.reset_index(), on="taxon")
    entries["frequency"] = entries["n_trait"].fillna(0) / entries["taxon_images"]
    entries = entries[entries["taxon"].isin(measured) | (entries["frequency"] > 0)]
    entries = entries.sort_values(["taxon", "separation", "frequency", "prompt", "head"],
                                  ascending=[True, False, False, True, True], na_position="last")
    entries = entries.groupby("taxon", observed=True).head(num_heads).copy()
    entries["entry"] = entries.groupby("taxon", observed=True).cumcount() + 1
    entries = entries.rename(columns={"with": "strength_with", "without": "strength_without",
                                      "n_with": "n_images_with", "n_without": "n_images_without"})
    entries["rank"], entries["contrast"] = heads["rank"].iloc[0], heads["contrast"].iloc[0]
    entries["part"] = entries["part"].fillna("")
    return entries[list(KEY_ENTRY_COLUMNS)].astype(KEY_ENTRY_COLUMNS).reset_index(drop=True)


def key_table(entries_by_rank: list[pd.DataFrame], classes: pd.DataFrame, ranks: list[str]) -> pd.DataFrame:
    """key.parquet: every rank's key entries (`key_entries`), each under the fork it decides (`node`: the child's
    parent, `ROOT` above the top rank; `node_rank`: its rank, '' for the root; `n_children`: the node's children,
    1 for a monotypic taxon, which has no entries: nothing tells it apart)."""
    children = classes.assign(parent=classes["parent"].fillna("").astype(str))
    sizes = children.groupby(["rank", "parent"])["taxon"].transform("size")
    node_of = dict(zip(zip(children["rank"], children["taxon"]), zip(children["parent"], sizes)))
    frames = []
    for depth, (rank, entries) in enumerate(zip(ranks, entries_by_rank)):
        nodes = [node_of[(rank, taxon)] for taxon in entries["taxon"]]
        frames.append(entries.assign(node_rank=ranks[depth - 1] if depth else "",
                                     node=[node or ROOT for node, _ in nodes],
                                     n_children=np.array([n for _, n in nodes], dtype=np.int64)))
    table = pd.concat(frames, ignore_index=True)[[*KEY_COLUMNS, *KEY_ENTRY_COLUMNS]]
    return table.astype({"node_rank": "string", "node": "string", "n_children": "int64", **KEY_ENTRY_COLUMNS})


def key_markdown(key: pd.DataFrame, classes: pd.DataFrame, ranks: list[str], entries_per_child: int = 2) -> str:
    """key.md: the key as couplets, coarse to fine, one section per fork ("Familia_A1 → Genus_A1a vs Genus_A1b"),
    each child with its best entries (`key_cell`); monotypic taxa are listed as such; where the entries are named
    after ground truth whose parts are the ranks (the demo's planted traits), how many taxa's best entry lies on
    their rank's own trait."""
    contrast = ", ".join(sorted(set(key["contrast"].dropna())))
    lines = ["# Key to the taxa" + (f" (contrast: {contrast})" if contrast else ""), "",
             "At each fork, what tells each child from its siblings, best first: a head of the child's own prompt "
             "that fires on its images and not on its siblings' (**present**), or a head of a sibling's prompt that "
             "fires on the sibling's images and not on the child's (**absent**: the child lacks that trait). Each "
             "entry is placed where its head fires on the images that have the trait (the part and the share of "
             "those images where it points there, with ground truth) and gives its strength (what the head adds to "
             "its prompt's score) on the images with and without the trait, and the separation with its 95 % "
             "interval.", ""]
    monotypic = []
    for rank in ranks:
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
                child = key[(key["rank"] == rank) & (key["taxon"] == name)].sort_values("entry")
                cells = [key_cell(r) for r in child.head(entries_per_child).itertuples(index=False)]
                lines.append(f"- **{name}**: " + ("; ".join(cells) if cells else
                                                  "no head tells it apart (none of its images correctly classified, "
                                                  "or no separation whose 95 % interval lies above 0)"))
            lines.append("")
    if monotypic:
        lines += ["## Monotypic taxa", "", *monotypic, ""]
    on_trait = key_on_rank_traits(key, ranks)
    if len(on_trait):
        cells = [f"{r.rank} {r.on_trait}/{r.n_taxa}" for r in on_trait.itertuples(index=False)]
        lines += ["## Entries on the planted traits", "",
                  f"Taxa whose best entry lies on their rank's own trait (the part named after the rank): "
                  f"{', '.join(cells)}; {on_trait['on_trait'].sum()} of {on_trait['n_taxa'].sum()}.", ""]
    return "\n".join(lines)


def key_cell(row) -> str:
    """One key entry in words: 'present: head 3, species region (95 %); fires 0.84 with, 0.05 without (separation
    0.79 [0.61, 0.97])', or 'absent: head 2 of Species_B's prompt, species region on Species_B's images (95 %); ...'
    (the peak and spread in place of the region without ground truth; no separation where none was measured)."""
    on = "" if row.prompt == row.taxon else f" on {row.prompt}'s images"
    where = (f"{row.part} region{on} ({row.part_share:.0%})" if isinstance(row.part, str) and row.part
             else f"peak at x {row.peak_x:.2f}, y {row.peak_y:.2f}{on}, spread {row.spread:.2f}")
    if pd.isna(row.separation):
        return f"{row.evidence}: {_head_label(row)}, {where}, a trait head on {row.frequency:.0%} of images"
    return (f"{row.evidence}: {_head_label(row)}, {where}; fires {row.strength_with:.2f} with, "
            f"{row.strength_without:.2f} without (separation {row.separation:.2f} "
            f"[{row.separation_low:.2f}, {row.separation_high:.2f}])")


def key_on_rank_traits(key: pd.DataFrame, ranks: list[str]) -> pd.DataFrame:
    """Per rank whose name is a ground-truth part (the demo's planted traits): the taxa with a key entry (`n_taxa`)
    and those whose best entry's part is the rank's own trait (`on_trait`); empty without such ground truth."""
    parts = set(key["part"].dropna()) - {""}
    best = key[key["entry"] == 1]
    best = best[best["rank"].isin([r for r in ranks if r in parts])]
    table = best.assign(on_trait=best["part"] == best["rank"]).groupby("rank", sort=False).agg(
        n_taxa=("taxon", "size"), on_trait=("on_trait", "sum")).reset_index()
    return table.astype({"n_taxa": "int64", "on_trait": "int64"})


def load_key(results: str | os.PathLike, node: str | None = None) -> pd.DataFrame:
    """key.parquet of a dataset's results folder, optionally the rows of one fork (`node`: the parent taxon, or
    `ROOT`)."""
    path = Path(results) / "key.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no key.parquet in {results}")
    table = pd.read_parquet(path)
    return table if node is None else table[table["node"] == node].reset_index(drop=True)
