"""Step of workflow/rules/evaluate.smk: accuracy tables of every rank (flat, among siblings, top-down)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..dataset import class_names, class_parents, labels
from ..devices import model_device
from ..io import write_parquet
from ..taxonomy import parent_index, top_down_prediction
from ..train import ordered_batches, scorer, top_k_hits
from .common import model_step_device, token_data, trained_model

log = logging.getLogger("taxotrait")

METRICS_COLUMNS = {"rank": "string", "split": "string", "taxon": "string", "n_images": "int64",
                   "top1": "float64", "top5": "float64", "sibling_top1": "float64", "top_down_top1": "float64",
                   "contrast": "string", "device": "string"}
# What is counted per true class: its images, then the images of each accuracy column that are right.
COUNTED = ("n_images", "top1", "top5", "sibling_top1", "top_down_top1")
# Images scored at once: the step holds the logits of one batch at one rank, [BATCH_SIZE, classes], at a time.
BATCH_SIZE = 256
# Classes per forward chunk where `model.class_chunk` is null: the last block then runs for at most BATCH_SIZE x
# CLASS_CHUNK class prompts at once, whatever the number of classes.
CLASS_CHUNK = 512


def evaluate(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """<rank>/metrics.parquet of every rank: accuracy on val and test, overall (taxon '__all__') and per class: flat
    top-1/top-5 over every class of the rank, sibling top-1 (among the true parent's children) and top-down top-1 (the
    top rank's prediction, then the best child of each predicted taxon). `inputs['models']`: the models of the first
    ranks of `ranks`, coarse to fine (each batch scored once per rank, its prediction feeding the finer ranks'
    top-down prediction); `outputs['metrics']`: their tables, in the same order. Streams each split in batches of
    BATCH_SIZE images on the model steps' device (classes in chunks of `model.class_chunk`, else CLASS_CHUNK),
    keeping only per-class counts. Settings: `ranks`, `backbone`, `model.class_chunk`, `train.device`."""
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    paths, targets, all_ranks = list(inputs["models"]), list(outputs["metrics"]), list(settings["ranks"])
    ranks = all_ranks[: len(paths)]
    if len(paths) > len(all_ranks) or len(targets) != len(paths):
        raise ValueError(f"evaluate: {len(paths)} models and {len(targets)} metrics tables for the ranks "
                         f"{all_ranks} (one of each per rank, coarse to fine)")
    device = model_step_device(settings)
    models = [trained_model(path, settings, device) for path in paths]
    parents = [None] + [torch.as_tensor(parent_index(class_parents(classes, rank), class_names(classes, above),
                                                     str(inputs["classes"])), device=device)
                        for above, rank in zip(ranks, ranks[1:])]
    tables = {rank: [] for rank in ranks}
    for split in ("val", "test"):
        data, split_rows = token_data(inputs["eval_tokens"], manifest, classes, ranks[0], split)
        if split_rows.empty:
            continue
        truths = [torch.tensor(labels(split_rows, classes, rank).to_numpy()) for rank in ranks]
        counts = hit_counts(models, parents, data, truths, settings["model"]["class_chunk"] or CLASS_CHUNK,
                            f"evaluate {split}")
        for rank, model, count in zip(ranks, models, counts):
            tables[rank].append(metrics_table(rank, split, model, count))
    for rank, model, target in zip(ranks, models, targets):
        metrics = pd.concat(tables[rank] or [pd.DataFrame(columns=list(METRICS_COLUMNS)[:-1])], ignore_index=True)
        metrics = metrics.assign(device=str(device)).astype(METRICS_COLUMNS)
        write_parquet(metrics, target)
        overall = metrics[metrics["taxon"] == "__all__"].set_index("split")[["top1", "sibling_top1", "top_down_top1"]]
        log.info("%s (contrast %s):\n%s", rank, model.contrast, overall.round(3).to_string())


def hit_counts(models: list, parents: list, data, truths: list[torch.Tensor], chunk_size: int | None,
               description: str) -> list[np.ndarray]:
    """Per rank, int64 [len(COUNTED), C]: the images of `data` of each true class and, of them, those right by each
    accuracy of COUNTED. models, parents (`parent_index` tensors on the models' device; None at the top rank),
    truths (each image's class index [N]): per rank, coarse to fine. Scores one batch at one rank at a time."""
    device = model_device(models[0])
    scores = [scorer(model, data, chunk_size=chunk_size) for model in models]
    counts = [torch.zeros(len(COUNTED), model.num_classes, dtype=torch.int64, device=device) for model in models]
    start = 0
    for x, _ in tqdm(ordered_batches(data, BATCH_SIZE, device), total=math.ceil(len(data) / BATCH_SIZE),
                     desc=description):
        stop, predicted = start + len(x), None
        for model, score, above, truth, count in zip(models, scores, parents, truths, counts):
            logits, truth = score(x), truth[start:stop].to(device)
            predicted = top_down_prediction(logits, above, predicted)
            right = torch.stack([torch.ones_like(truth, dtype=torch.bool), top_k_hits(logits, truth, 1),
                                 top_k_hits(logits, truth, 5), model.sibling_prediction(logits, truth) == truth,
                                 predicted == truth])
            row = torch.arange(len(COUNTED), device=device)[:, None] * model.num_classes
            count += torch.bincount((row + truth)[right], minlength=count.numel()).view_as(count)
        start = stop
    return [count.cpu().numpy() for count in counts]


def metrics_table(rank: str, split: str, model, counts: np.ndarray) -> pd.DataFrame:
    """The metrics rows of `rank` on `split` (METRICS_COLUMNS but `device`) from `hit_counts`' `counts`: '__all__',
    then every class of `model` with images, in class order."""
    seen = np.flatnonzero(counts[0])
    table = np.concatenate([counts.sum(1, keepdims=True), counts[:, seen]], axis=1)
    return pd.DataFrame({"rank": rank, "split": split,
                         "taxon": ["__all__", *(model.class_names[i] for i in seen)], "n_images": table[0],
                         **{column: table[k] / table[0] for k, column in enumerate(COUNTED[1:], 1)},
                         "contrast": model.contrast})
