"""Step of workflow/rules/data.smk: the embedded demo dataset."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..synthetic import generate_dataset


def synthetic_data(outputs: Mapping, settings: Mapping, workers: int = 1) -> None:
    """The synthetic taxonomy of `data.synthetic` (images, masks, manifest.csv, taxonomy.csv, traits.csv) in the
    folder of `outputs['manifest']`, made by `workers` processes."""
    generate_dataset(Path(outputs["manifest"]).parent, **settings["data"]["synthetic"], workers=workers)
