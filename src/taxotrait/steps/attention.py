"""Step of workflow/rules/attention.smk: the attention maps of the true, predicted and sibling class prompts."""

from __future__ import annotations

from collections.abc import Mapping

from .. import extract
from .common import eval_batches, model_step_device, trained_model


def extract_attention(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping, threads: int = 1) -> None:
    """<rank>/attention.h5 of the `attention.split` images, its maps compressed on the job's `threads`. Settings:
    `backbone`, `attention`, `model.class_chunk`, the rank's `train.device`."""
    model = trained_model(inputs["model"], settings, model_step_device(settings))
    batches, count, classes = eval_batches(inputs, settings, rank)
    rank_classes = classes[classes["rank"] == rank].sort_values("class_index")
    extra = extract.sibling_classes(rank_classes["parent"].tolist(), settings["attention"]["extra_classes"])
    extract.extract_attention(model, batches(), count, outputs["attention"], rank, extra,
                              chunk_size=settings["model"]["class_chunk"], threads=threads)
