"""Step of workflow/rules/masking.smk: batched greedy head masking, the trait heads of each image."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .. import extract
from ..io import write_parquet
from .common import eval_batches, model_step_device, trained_model

log = logging.getLogger("taxotrait")


def mask_heads(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """<rank>/heads.parquet of the correctly classified `attention.split` images. Settings: `backbone`,
    `attention.split`, `attention.batch_size`, `masking`, `model.class_chunk`, the rank's `train.device`."""
    model = trained_model(inputs["model"], settings, model_step_device(settings))
    batches, _, _ = eval_batches(inputs, settings, rank)
    m = settings["masking"]
    heads = extract.mask_heads(model, batches(), inputs["attention"], rank, m["blur_mode"], m["stopping"], m["top_k"],
                               settings["model"]["class_chunk"], m["sibling_prompts"])
    write_parquet(heads, outputs["heads"])
    log.info("%s: %d correctly classified images masked, %.2f trait heads per image", rank,
             heads["image_id"].nunique(), heads["is_trait_head"].sum() / max(1, heads["image_id"].nunique()))
