"""Step of workflow/rules/prepare.smk: validate the images against the taxonomy."""

from __future__ import annotations

from collections.abc import Mapping

from ..dataset import prepare_files


def prepare(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """The image tree or manifest + taxonomy -> manifest, classes and rejects tables. Settings: `data`, `ranks`."""
    prepare_files(inputs, outputs, settings["data"], list(settings["ranks"]))
