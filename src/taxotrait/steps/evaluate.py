"""Step of workflow/rules/evaluate.smk: accuracy tables of every rank (flat, among siblings, top-down)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pandas as pd
import torch

from ..dataset import class_names, class_parents, labels
from ..io import write_parquet
from ..taxonomy import top_down_prediction
from ..train import predict, top_k_accuracy
from .common import model_step_device, token_data, trained_model

log = logging.getLogger("taxotrait")

METRICS_COLUMNS = {"rank": "string", "split": "string", "taxon": "string", "n_images": "int64",
                   "top1": "float64", "top5": "float64", "sibling_top1": "float64", "top_down_top1": "float64",
                   "contrast": "string", "device": "string"}


def evaluate(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """<rank>/metrics.parquet of every rank: accuracy on val and test, overall (taxon '__all__') and per class: flat
    top-1/top-5 over every class of the rank, sibling top-1 (among the true parent's children) and top-down top-1 (the
    top rank's prediction, then the best child of each predicted taxon). `inputs['models']`: the models of the first
    ranks of `ranks`, coarse to fine (each scored once, its scores shared by the finer ranks' top-down prediction);
    `outputs['metrics']`: their tables, in the same order. Settings: `ranks`, `backbone`, `model.class_chunk`,
    `train.device`."""
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    paths, targets, all_ranks = list(inputs["models"]), list(outputs["metrics"]), list(settings["ranks"])
    ranks = all_ranks[: len(paths)]
    if len(paths) > len(all_ranks) or len(targets) != len(paths):
        raise ValueError(f"evaluate: {len(paths)} models and {len(targets)} metrics tables for the ranks "
                         f"{all_ranks} (one of each per rank, coarse to fine)")
    device = model_step_device(settings)
    models = [trained_model(path, settings, device) for path in paths]
    parents, names = [class_parents(classes, r) for r in ranks], [class_names(classes, r) for r in ranks]
    rows = {rank: [] for rank in ranks}
    for split in ("val", "test"):
        split_rows = manifest[manifest["split"] == split]
        if split_rows.empty:
            continue
        scores = [predict(m, token_data(inputs["eval_tokens"], manifest, classes, r, split)[0],
                          chunk_size=settings["model"]["class_chunk"]) for m, r in zip(models, ranks)]
        for depth, (rank, model, logits) in enumerate(zip(ranks, models, scores)):
            truth = torch.as_tensor(labels(split_rows, classes, rank).to_numpy())
            sibling = model.sibling_prediction(logits, truth) == truth
            top_down = top_down_prediction(scores[: depth + 1], parents[: depth + 1], names[: depth + 1]) == truth
            for taxon, pick in [("__all__", torch.ones_like(truth, dtype=torch.bool)),
                                *((name, truth == index) for index, name in enumerate(model.class_names))]:
                if pick.any():
                    rows[rank].append((rank, split, taxon, int(pick.sum()),
                                       top_k_accuracy(logits[pick], truth[pick], 1),
                                       top_k_accuracy(logits[pick], truth[pick], 5),
                                       sibling[pick].double().mean().item(), top_down[pick].double().mean().item(),
                                       model.contrast))
    for rank, model, target in zip(ranks, models, targets):
        metrics = pd.DataFrame(rows[rank], columns=list(METRICS_COLUMNS)[:-1]).assign(device=str(device))
        write_parquet(metrics.astype(METRICS_COLUMNS), target)
        overall = metrics[metrics["taxon"] == "__all__"].set_index("split")[["top1", "sibling_top1", "top_down_top1"]]
        log.info("%s (contrast %s):\n%s", rank, model.contrast, overall.round(3).to_string())
