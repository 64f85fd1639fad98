"""Step of workflow/rules/cache.smk: the frozen tokens entering the first prompted block, once per dataset."""

from __future__ import annotations

from collections.abc import Mapping

from ..data import AugmentConfig
from ..dataset import SPLITS, job_cpus, read_manifest_table
from ..token_cache import build_token_cache
from .common import model_step_device, new_model


def cache_tokens(kind: str, manifest_path, out_path, settings: Mapping, threads: int = 1) -> None:
    """Frozen tokens of the training images (`kind` 'train': `augment.views` augmented views drawn from
    `train.seed`) or of the val and test images ('eval': the eval transform), the images decoded in all but one of
    the job's `threads` (`job_cpus`: worker processes) and the forward in this one. Settings: `backbone`, `model`,
    `augment`, `train.device`, and `train.seed` for 'train'."""
    probe = new_model(settings, ["probe"])
    a = settings["augment"]
    if kind == "train":
        splits, seed = ["train"], settings["train"]["seed"]
        augment, views = AugmentConfig(a["resize"], a["crop"], a["hflip"]), a["views"]
    else:
        splits, seed = [split for split in SPLITS if split != "train"], 0
        augment, views = AugmentConfig(a["resize"], False, False), 1
    paths = read_manifest_table(manifest_path, ["path"], splits)["path"]
    build_token_cache(probe, paths.tolist(), out_path, views=views, augment=augment, seed=seed,
                      device=model_step_device(settings), precision=settings["backbone"]["precision"],
                      num_workers=job_cpus(threads) - 1)
