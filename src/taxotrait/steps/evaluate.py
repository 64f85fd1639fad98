"""Step of workflow/rules/evaluate.smk: accuracy tables of every rank (flat, among siblings, top-down)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..dataset import class_names, class_parents, labels, read_manifest_table
from ..devices import mixed_precision, model_device
from ..evaluation import stratified_order
from ..model import families, family_members
from ..io import write_parquet
from ..taxonomy import parent_index
from ..train import ordered_batches, top_k_hits
from .common import model_step_device, token_data, trained_model

log = logging.getLogger("taxotrait")

METRICS_COLUMNS = {"rank": "string", "split": "string", "taxon": "string", "n_images": "int64",
                   "top1": "float64", "top5": "float64", "sibling_top1": "float64", "top_down_top1": "float64",
                   "contrast": "string", "device": "string", "n_flat_images": "int64"}
# What is counted per true class: its images, those of the flat sample, then the images right by each accuracy
# (top1 and top5 among the flat sample's).
COUNTED = ("n_images", "n_flat_images", "top1", "top5", "sibling_top1", "top_down_top1")
# Images scored at once: the step holds the scores of one batch at one rank, at most [BATCH_SIZE, classes], at a time.
BATCH_SIZE = 256
# Classes per forward chunk where `model.class_chunk` is null: the last block then runs for at most BATCH_SIZE x
# CLASS_CHUNK class prompts at once, whatever the number of classes (32,768: about 0.5 GB at ViT-S; 512 took 3.4 GB,
# bench/RESULTS.md, taxonomy scale).
CLASS_CHUNK = 128


def evaluate(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """<rank>/metrics.parquet of every rank: accuracy on val and test, overall (taxon '__all__') and per class:
    sibling top-1 (among the true parent's children) and top-down top-1 (the top rank's prediction, then the best
    child of each predicted taxon) of every image, each scored against those children only; flat top-1/top-5 (every
    class of the rank scored) of a sample of `metrics.flat_images` images per split stratified over the finest rank's
    taxa (all when null or fewer). `inputs['models']`: the models of the first ranks of `ranks`, coarse to fine (each
    batch's top-down prediction feeding the next rank's); `outputs['metrics']`: their tables, in the same order.
    Streams each split in batches of BATCH_SIZE images on the model steps' device (classes in chunks of
    `model.class_chunk`, else CLASS_CHUNK), keeping only per-class counts: the cost grows with the images times the
    siblings, plus the flat sample times the classes. Settings: `ranks`, `backbone`, `model.class_chunk`,
    `metrics.flat_images`, `train.device`."""
    paths, targets, all_ranks = list(inputs["models"]), list(outputs["metrics"]), list(settings["ranks"])
    ranks = all_ranks[: len(paths)]
    if len(paths) > len(all_ranks) or len(targets) != len(paths):
        raise ValueError(f"evaluate: {len(paths)} models and {len(targets)} metrics tables for the ranks "
                         f"{all_ranks} (one of each per rank, coarse to fine)")
    scored = dict.fromkeys([*ranks, all_ranks[-1]])  # the ranks' labels and the finest rank (the flat sample's)
    manifest = read_manifest_table(inputs["manifest"], ["path", "split", *scored], ["val", "test"])
    classes = pd.read_parquet(inputs["classes"])
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
        flat = flat_sample(split_rows[all_ranks[-1]], settings["metrics"]["flat_images"])
        counts = hit_counts(models, parents, data, truths, flat, settings["model"]["class_chunk"] or CLASS_CHUNK,
                            f"evaluate {split}")
        for rank, model, count in zip(ranks, models, counts):
            tables[rank].append(metrics_table(rank, split, model, count))
    for rank, model, target in zip(ranks, models, targets):
        metrics = pd.concat(tables[rank] or [pd.DataFrame(columns=list(METRICS_COLUMNS))], ignore_index=True)
        metrics = metrics.assign(device=str(device)).astype(METRICS_COLUMNS)
        write_parquet(metrics, target)
        overall = metrics[metrics["taxon"] == "__all__"].set_index("split")[["top1", "sibling_top1", "top_down_top1"]]
        log.info("%s (contrast %s):\n%s", rank, model.contrast, overall.round(3).to_string())


def flat_sample(taxa: pd.Series, size: int | None) -> torch.Tensor:
    """bool [N]: the images whose flat accuracy is computed: the first `size` in round-robin order over `taxa`
    (`stratified_order`: every taxon once before any twice), all when `size` is None or at least N."""
    chosen = torch.zeros(len(taxa), dtype=torch.bool)
    chosen[torch.from_numpy(stratified_order(taxa)[:size])] = True
    return chosen


def best_column(model, keys_values: torch.Tensor, columns: torch.Tensor, present: torch.Tensor,
                chunk_size: int | None) -> torch.Tensor:
    """The class [B] of the best-scoring present column (`PromptCAM.best_rival`) of each image."""
    scores = model.forward_keys_values(keys_values, columns, chunk_size=chunk_size).float()
    return model.best_rival(scores, columns, present)


def children_columns(parent: torch.Tensor, family: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns [B, W], present [B, W]): the children of each image's `parent` [B] (class indices at the coarser
    rank), from `families` of the rank's `parent_index`: what top-down prediction chooses among."""
    _, members, first, size = family
    return family_members(parent, members, first, size, members[first[parent]])


@torch.no_grad()
def hit_counts(models: list, parents: list, data, truths: list[torch.Tensor], flat: torch.Tensor,
               chunk_size: int | None, description: str) -> list[np.ndarray]:
    """Per rank, int64 [len(COUNTED), C]: the images of `data` of each true class, those of the `flat` sample
    (bool [N]) and, of them, those right by each accuracy of COUNTED. models, parents (`parent_index` tensors on the
    models' device; None at the top rank), truths (each image's class index [N]): per rank, coarse to fine. Each
    image is scored against its true parent's children (sibling top-1) and its predicted parent's (top-down); the
    flat sample's images against every class."""
    device = model_device(models[0])
    children = [None if above is None else families(above) for above in parents]
    counts = [torch.zeros(len(COUNTED), model.num_classes, dtype=torch.int64, device=device) for model in models]
    start = 0
    for x, _ in tqdm(ordered_batches(data, BATCH_SIZE, device), total=math.ceil(len(data) / BATCH_SIZE),
                     desc=description):
        stop, predicted = start + len(x), None
        sampled = flat[start:stop].to(device)
        for model, family, truth, count in zip(models, children, truths, counts):
            truth = truth[start:stop].to(device)
            with mixed_precision(device):
                keys_values = model.image_keys_values(model.last_block_input(x))
                sibling = best_column(model, keys_values, *model.rival_columns(truth), chunk_size)
                if family is None:  # the top rank: every class
                    every = torch.arange(model.num_classes, device=device)
                    predicted = best_column(model, keys_values, every, torch.ones_like(every, dtype=torch.bool),
                                            chunk_size)
                else:  # the children of the taxon predicted above
                    predicted = best_column(model, keys_values, *children_columns(predicted, family), chunk_size)
                top1 = top5 = torch.zeros_like(sampled)
                if sampled.any():
                    logits = model.forward_keys_values(keys_values[sampled], chunk_size=chunk_size).float()
                    top1, top5 = (torch.zeros_like(sampled).masked_scatter(sampled, top_k_hits(logits, truth[sampled], k))
                                  for k in (1, 5))
            right = torch.stack([torch.ones_like(sampled), sampled, top1, top5, sibling == truth, predicted == truth])
            row = torch.arange(len(COUNTED), device=device)[:, None] * model.num_classes
            count += torch.bincount((row + truth)[right], minlength=count.numel()).view_as(count)
        start = stop
    return [count.cpu().numpy() for count in counts]


def metrics_table(rank: str, split: str, model, counts: np.ndarray) -> pd.DataFrame:
    """The metrics rows of `rank` on `split` (METRICS_COLUMNS but `device`) from `hit_counts`' `counts`: '__all__',
    then every class of `model` with images, in class order; flat top-1/top-5 NaN where no image is in the flat
    sample."""
    seen = np.flatnonzero(counts[0])
    table = np.concatenate([counts.sum(1, keepdims=True), counts[:, seen]], axis=1).astype(np.float64)
    images, flat = table[0], table[1]

    def share(hits, of):
        return np.divide(hits, of, out=np.full_like(hits, np.nan), where=of > 0)

    return pd.DataFrame({"rank": rank, "split": split,
                         "taxon": ["__all__", *(model.class_names[i] for i in seen)], "n_images": images,
                         "top1": share(table[2], flat), "top5": share(table[3], flat),
                         "sibling_top1": share(table[4], images), "top_down_top1": share(table[5], images),
                         "contrast": model.contrast, "device": "", "n_flat_images": flat})
