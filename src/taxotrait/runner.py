"""The Snakemake script adapter (no torch import): a step run from a rule's `script:` with its log file, and the
workflow's start-up checks stopped with their message alone."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import InputError

log = logging.getLogger("taxotrait")

# glibc's allocator in the jobs: by default the memory a forward frees at the top of the heap goes back to the kernel
# and the next batch faults it in again, 10-15 % of a model step's CPU time spent in the kernel; with these, freed
# memory up to 1 GB is kept, buffers up to 32 MB (glibc's largest) come from the heap, and the threads that run
# frozen forwards side by side share that heap rather than each growing and dropping an arena of its own
# (bench/frozen_forward.py, bench/RESULTS.md)
ALLOCATOR_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30),
                         "MALLOC_ARENA_MAX": "1"}


def tune_allocator(environ=os.environ) -> None:
    """Set `ALLOCATOR_ENVIRONMENT` in `environ` (the workflow's: every job inherits it) where the user has not set
    those variables; glibc reads them when a process starts."""
    for key, value in ALLOCATOR_ENVIRONMENT.items():
        environ.setdefault(key, value)


@contextmanager
def stopping_at_start(report) -> Iterator[None]:
    """The workflow's start-up checks: an InputError (config or dataset) ends Snakemake with its message alone,
    passed to `report` (Snakemake's logger.error), without Python stack frames. Also a decorator, of the functions
    Snakemake calls while it plans the jobs: SystemExit passes through its handling of their errors, which would
    print stack frames."""
    try:
        yield
    except InputError as err:
        report(f"{type(err).__name__}: {err}")
        raise SystemExit(1) from None


def apply_image_limit(settings) -> None:
    """Set PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) from data.max_image_pixels, when set: every step
    that opens images (its rule passes data.max_image_pixels) then rejects (prepare) or refuses the same images."""
    limit = (settings.get("data") or {}).get("max_image_pixels")
    if limit:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = int(limit)


def run_step(snakemake, step) -> None:
    """Run `step(snakemake, settings)` with logging to the rule's log file; `settings`: the rule's `params: settings`
    (`taxotrait.steps.Settings`: reading a setting the rule does not pass is an error). Known input errors are logged
    as one message."""
    from .steps import Settings

    handlers = [logging.FileHandler(snakemake.log[0], mode="w"), logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, snakemake.threads))
    settings = Settings.from_params(snakemake.params.get("settings"), snakemake.rule)
    try:
        if settings.passes("data.max_image_pixels"):
            apply_image_limit(settings)
        step(snakemake, settings)
    except InputError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    except Exception:
        log.exception("step failed")
        raise
