"""Steps of workflow/rules/key.smk: the key (at every fork, what tells each child from its siblings) and its figure."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..figures import key_figures
from ..io import atomic_write, write_parquet
from ..report import KEY_SETTINGS, page_html
from ..traits import key_markdown, key_table


def key(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """Every rank's key entries + classes.parquet -> key.parquet, key.md and key.html (the key beside the settings
    `taxotrait.report.KEY_SETTINGS`, which the rule passes)."""
    classes, ranks = pd.read_parquet(inputs["classes"]), list(settings["ranks"])
    table = key_table([pd.read_parquet(p) for p in inputs["key_entries"]], classes, ranks)
    write_parquet(table, outputs["table"])
    text = key_markdown(table, classes, ranks)
    for name, content in (("markdown", text), ("html", page_html(text, settings, KEY_SETTINGS))):
        with atomic_write(outputs[name]) as tmp:
            Path(tmp).write_text(content, encoding="utf-8")


def key_figure(inputs: Mapping, outputs: Mapping, settings: Mapping, workers: int = 1) -> None:
    """figures/key/: the key's forks with each child's trait maps, as pages drawn by `workers` processes, the
    report's selection of them and their index page. Settings: `ranks`, `augment.resize`,
    `figures.report_galleries`."""
    ranks = list(settings["ranks"])
    key_figures(inputs["key"], inputs["classes"], dict(zip(ranks, inputs["attention"])), inputs["manifest"],
                outputs["pages"], ranks, settings["augment"]["resize"], settings["figures"]["report_galleries"],
                workers=workers)
