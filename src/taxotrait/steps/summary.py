"""Step of workflow/rules/summary.smk: accuracy, the pointing game and, where there is ground truth, the targets."""

from __future__ import annotations

from collections.abc import Mapping

from ..io import atomic_outputs
from ..summary import summarise


def summary(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """summary.md, summary.html and pointing_game.parquet (every output written under a temporary name, then
    renamed). Settings: `taxotrait.report.SUMMARY_SETTINGS`, shown in summary.html."""
    with atomic_outputs(outputs) as files:
        summarise(inputs, files, list(settings["ranks"]), settings["attention"]["split"],
                  settings["augment"]["resize"], settings["backbone"]["img_size"], settings)
