"""The run's summary: accuracy per rank, the pointing game against ground-truth masks, and the demo's targets."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .attention_store import AttentionFile
from .dataset import read_manifest_table
from .groundtruth import load_masks
from .localization import EXCLUSIVE, PLANTED, POINTING_COLUMNS, pointing_game
from .report import SUMMARY_SETTINGS, page_html
from .io import empty_table, parquet_columns, write_parquet
from .traits import key_on_rank_traits

log = logging.getLogger("taxotrait.summary")


def summarise(inputs: Mapping, outputs: Mapping, ranks: list[str], split: str, resize: int, img_size: int,
              page_settings: Mapping) -> None:
    """Write summary.md, its HTML page (summary.html, with `page_settings`: the run's settings
    `taxotrait.report.SUMMARY_SETTINGS`) and pointing_game.parquet from every rank's metrics (on `split`), heads and
    attention files and the key; the pointing game on the eval crop (`resize`, `img_size`)."""
    metrics = pd.concat([pd.read_parquet(p) for p in inputs["metrics"]], ignore_index=True)
    test = metrics[(metrics["taxon"] == "__all__") & (metrics["split"] == split)]
    pointing = empty_table(POINTING_COLUMNS)
    if "mask_path" in parquet_columns(inputs["manifest"]):
        with AttentionFile(inputs["attention"][0]) as attention:  # one backbone: every rank's patch grid
            grid = attention.grid
        heads = pd.concat([pd.read_parquet(path) for path in inputs["heads"]], ignore_index=True)
        masks = read_manifest_table(inputs["manifest"], ["image_id", "mask_path"])
        pointing = pointing_game(heads, masks, load_masks, grid, resize, img_size)
    write_parquet(pointing, outputs["pointing"])
    text = summary_text(test, pointing, ranks, key_on_rank_traits(pd.read_parquet(inputs["key"]), ranks))
    Path(outputs["summary"]).write_text(text)
    Path(outputs["html"]).write_text(page_html(text, page_settings, SUMMARY_SETTINGS), encoding="utf-8")
    log.info("\n%s", text)


def summary_text(test: pd.DataFrame, pointing: pd.DataFrame, ranks: list[str],
                 key_on_trait: pd.DataFrame | None = None) -> str:
    """Markdown: accuracy and pointing game per rank, and each demo target met or missed (by how much).

    Targets, only where the dataset has ground truth (planted trait masks: the pointing game has rows): the rank's
    prediction (top-down under contrast 'siblings', flat under 'rank') >= 0.90 top-1; where
    there are ground-truth masks, the top trait head's peak within the pointing game's tolerance of the rank's own
    trait (exclusive region) on >= 0.80 of correctly classified images, the region under the peak the rank's
    own trait more often than any other single region, and every taxon's best key entry on its rank's own trait
    (`key_on_trait`: `taxotrait.traits.key_on_rank_traits`)."""
    lines = ["# taxotrait summary", "",
             "| rank | contrast | top-1 (top-down) | top-1 among siblings | top-1 flat | top-5 flat | images |",
             "|---|---|---|---|---|---|---|"]
    for row in test.itertuples(index=False):
        lines.append(f"| {row.rank} | {row.contrast} | {row.top_down_top1:.3f} | {row.sibling_top1:.3f} | "
                     f"{row.top1:.3f} | {row.top5:.3f} | {row.n_images} |")
    prediction = {row.rank: row.top_down_top1 if row.contrast == "siblings" else row.top1
                  for row in test.itertuples(index=False)}
    targets = [(f"top-1 ({'top-down' if c == 'siblings' else 'flat'}) >= 0.90", rank, prediction.get(rank, float("nan")),
                0.90) for rank, c in zip(test["rank"], test["contrast"])]
    if len(pointing):
        masks = list(dict.fromkeys(pointing["mask"]))
        for region, title in ((PLANTED, "masks as planted (the body contains the stripe region and both marks)"),
                              (EXCLUSIVE, "exclusive regions (each pixel in the smallest mask covering it)")):
            lines += ["", f"Pointing game of the top trait head, {title}: hit within the tolerance (strict patch "
                      "hit) [random patch's tolerance hit]:", "",
                      "| rank | " + " | ".join(masks) + " |", "|---" * (len(masks) + 1) + "|"]
            for rank, rows in pointing[pointing["region"] == region].groupby("rank", sort=False):
                cells = {r.mask: f"{r.tolerance_hit_rate:.2f} ({r.hit_rate:.2f}) [{r.tolerance_random_rate:.2f}]"
                         for r in rows.itertuples(index=False)}
                lines.append(f"| {rank} | " + " | ".join(cells.get(m, "") for m in masks) + " |")
        exclusive = pointing[pointing["region"] == EXCLUSIVE].set_index(["rank", "mask"])
        lines += ["", "The region under the top trait head's peak (exclusive regions; the rest is background):", "",
                  "| rank | " + " | ".join(masks) + " |", "|---" * (len(masks) + 1) + "|"]
        for rank in dict.fromkeys(exclusive.index.get_level_values(0)):
            lines.append(f"| {rank} | " + " | ".join(f"{exclusive.loc[(rank, m), 'centre_rate']:.2f}"
                                                     if (rank, m) in exclusive.index else "" for m in masks) + " |")
        for rank in ranks:
            if (rank, rank) not in exclusive.index:
                continue
            own = exclusive.loc[(rank, rank)]
            targets.append((f"peak within the tolerance of the {rank} trait >= 0.80 (strict patch hit "
                            f"{own['hit_rate']:.3f})", rank, own["tolerance_hit_rate"], 0.80))
            others = exclusive.loc[rank]["centre_rate"].drop(rank)
            if len(others):
                targets.append((f"region under the peak: own trait more often than any other ({others.idxmax()} "
                                f"{others.max():.3f})", rank, own["centre_rate"], others.max() + 1e-9))
    if key_on_trait is not None and len(key_on_trait):
        lines += ["", "The key: taxa whose best entry lies on their rank's own trait (`key.md`):", "",
                  "| rank | on the own trait | taxa with an entry |", "|---|---|---|"]
        for row in key_on_trait.itertuples(index=False):
            lines.append(f"| {row.rank} | {row.on_trait} | {row.n_taxa} |")
            targets.append((f"key: best entry on the {row.rank} trait for every taxon ({row.on_trait} of "
                            f"{row.n_taxa})", row.rank, row.on_trait / row.n_taxa, 1.0))
    if not len(pointing):
        return "\n".join(lines + ["", "No targets: the dataset has no ground truth (trait masks) to score them on."]) + "\n"
    lines += ["", "## Targets", ""]
    for name, rank, value, goal in targets:
        verdict = "met" if value >= goal else f"MISSED by {goal - value:.3f}"
        lines.append(f"- {rank}: {name}: {value:.3f} — {verdict}")
    return "\n".join(lines) + "\n"
