"""Step of workflow/rules/prepare.smk: validate the images against the taxonomy."""

from __future__ import annotations

from collections.abc import Mapping

from ..dataset import job_cpus, prepare_files


def prepare(inputs: Mapping, outputs: Mapping, settings: Mapping, threads: int = 1) -> None:
    """The image tree or manifest + taxonomy -> manifest, classes and rejects tables, the images decoded in the job's
    `threads` processes (`job_cpus`). Settings: `data`, `ranks`."""
    prepare_files(inputs, outputs, settings["data"], list(settings["ranks"]), workers=job_cpus(threads))
