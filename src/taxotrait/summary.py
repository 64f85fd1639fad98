"""The run's summary: accuracy per rank, the pointing game against ground-truth masks, and the demo's targets."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import pandas as pd

from .localization import EXCLUSIVE, PLANTED, POINTING_COLUMNS, pointing_game
from .report import SUMMARY_SETTINGS, page_html
from .runner import empty_table, write_parquet
from .synthetic import load_masks

log = logging.getLogger("taxotrait.summary")


def summarise(inputs: dict, outputs: dict, config: dict) -> None:
    """Write summary.md, its HTML page with the run's settings (summary.html) and pointing_game.parquet from every
    rank's metrics, heads and attention files."""
    ranks = config["ranks"]
    manifest = pd.read_parquet(inputs["manifest"])
    metrics = pd.concat([pd.read_parquet(p) for p in inputs["metrics"]], ignore_index=True)
    test = metrics[(metrics["taxon"] == "__all__") & (metrics["split"] == config["attention"]["split"])]
    frames = []
    if "mask_path" in manifest.columns:
        for heads_path, attention_path in zip(inputs["heads"], inputs["attention"]):
            with h5py.File(attention_path, "r") as h5:
                grid = tuple(int(g) for g in h5.attrs["grid"])
            frames.append(pointing_game(pd.read_parquet(heads_path), manifest, load_masks, grid,
                                        config["augment"]["resize"], config["backbone"]["img_size"]))
    pointing = pd.concat(frames, ignore_index=True) if frames else empty_table(POINTING_COLUMNS)
    write_parquet(pointing, outputs["pointing"])
    text = summary_text(test, pointing, ranks)
    Path(outputs["summary"]).write_text(text)
    Path(outputs["html"]).write_text(page_html(text, config, SUMMARY_SETTINGS), encoding="utf-8")
    log.info("\n%s", text)


def summary_text(test: pd.DataFrame, pointing: pd.DataFrame, ranks: list[str]) -> str:
    """Markdown: accuracy and pointing game per rank, and each demo target met or missed (by how much)."""
    lines = ["# taxotrait summary", "", "| rank | top-1 | top-5 | images |", "|---|---|---|---|"]
    top1 = test.set_index("rank")["top1"].to_dict()
    for row in test.itertuples(index=False):
        lines.append(f"| {row.rank} | {row.top1:.3f} | {row.top5:.3f} | {row.n_images} |")
    targets = [("top-1 >= 0.90", rank, top1.get(rank, float("nan")), 0.90) for rank in ranks]
    if len(pointing):
        masks = list(dict.fromkeys(pointing["mask"]))
        for region, title in ((PLANTED, "masks as planted (the body contains the stripe region and both marks)"),
                              (EXCLUSIVE, "exclusive regions (each pixel in the smallest mask covering it)")):
            lines += ["", f"Pointing game of the top trait head, {title}; hit rate, random patch in brackets:", "",
                      "| rank | " + " | ".join(masks) + " |", "|---" * (len(masks) + 1) + "|"]
            for rank, rows in pointing[pointing["region"] == region].groupby("rank", sort=False):
                cells = {r.mask: f"{r.hit_rate:.2f} ({r.random_rate:.2f})" for r in rows.itertuples(index=False)}
                lines.append(f"| {rank} | " + " | ".join(cells.get(m, "") for m in masks) + " |")
        rates = pointing[pointing["region"] == EXCLUSIVE].set_index(["rank", "mask"])["hit_rate"]
        for rank in ranks:
            if (rank, rank) not in rates.index:
                continue
            others = rates[rank].drop(rank)
            if rank == ranks[-1]:
                targets.append((f"pointing on the {rank} mark >= 0.80", rank, rates[(rank, rank)], 0.80))
            elif len(others):
                targets.append((f"pointing on own trait > best other ({others.idxmax()}), exclusive regions", rank,
                                rates[(rank, rank)], others.max() + 1e-9))
    lines += ["", "## Targets", ""]
    for name, rank, value, goal in targets:
        verdict = "met" if value >= goal else f"MISSED by {goal - value:.3f}"
        lines.append(f"- {rank}: {name}: {value:.3f} — {verdict}")
    return "\n".join(lines) + "\n"
