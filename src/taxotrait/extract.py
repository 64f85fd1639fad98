"""Streamed extraction of class-prompt attention maps to ``attention.h5`` (its layout, writer and reader:
`taxotrait.attention_store`), and greedy head masking to a Parquet table.

Both steps run on the model's device (`taxotrait.devices`): each batch goes there, the results come back to the CPU.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .attention_store import AttentionFile, write_attention
from .devices import mixed_precision, model_device, to_host
from .masking import greedy_head_masking
from .model import PromptCAM
from .io import empty_table

TokenBatch = tuple[list[str], torch.Tensor, torch.Tensor]  # image ids, frozen tokens [B, T, D], labels [B]


def sibling_classes(parents: list[str], max_extra: int) -> list[list[int]]:
    """For each class, up to `max_extra` other classes with the same parent (all others at the top rank), in class
    order. Linear in the number of classes: only the first max_extra + 1 members of each parent's group are kept."""
    groups: dict[str, list[int]] = {}
    for index, parent in enumerate(parents):
        group = groups.setdefault(parent, [])
        if len(group) <= max_extra:
            group.append(index)
    return [[j for j in groups[parent] if j != index][:max_extra] for index, parent in enumerate(parents)]


def extra_class_table(extra_classes: list[list[int]], num_classes: int) -> torch.Tensor:
    """[C, E] int64: row c the extra classes of class c (`sibling_classes`), -1 where it has fewer than E. Built
    without a loop over the classes (at 10,000 classes: 6 ms, against 62 ms for a tensor per class)."""
    lengths = np.fromiter(map(len, extra_classes), dtype=np.int64, count=num_classes)
    table = np.full((num_classes, int(lengths.max(initial=0))), -1, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    table[np.repeat(np.arange(num_classes), lengths), np.arange(int(lengths.sum())) - starts] = np.fromiter(
        itertools.chain.from_iterable(extra_classes), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(table)


@torch.no_grad()
def extract_attention(
    model: PromptCAM,
    batches: Iterable[TokenBatch],
    num_images: int,
    out_path: str | os.PathLike,
    rank: str,
    extra_classes: list[list[int]] | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """Write `attention.h5` for the images of `batches` (`taxotrait.attention_store`), computed on the model's device
    (bf16 autocast on an accelerator, like `taxotrait.train.predict`), its maps compressed on `threads` threads.

    Each image is scored against its rivals only (`PromptCAM.rival_columns`: its siblings under contrast
    'siblings', every class in chunks of `chunk_size` under 'rank') for its prediction, then its true, predicted and
    extra classes' prompts give the stored maps and scores: the cost grows with the images times the siblings."""
    out_path = Path(out_path)
    device = model_device(model)
    extra = extra_class_table(extra_classes or [[] for _ in range(model.num_classes)], model.num_classes).to(device)
    num_slots = 2 + extra.shape[1]
    grid = tuple(int(g) for g in model.backbone.patch_embed.grid_size)
    config = model.config()
    attrs = {
        "rank": rank, "class_names": model.class_names, "grid": grid, "heads": model.num_heads,
        "backbone": config["backbone"], "backbone_digest": model.backbone_digest,
        "variant": config["variant"], "prompt_depth": config["prompt_depth"], "img_size": config["img_size"],
        "class_slots": "true, predicted, extra...", "contrast": model.contrast, "device": str(device),
    }
    with write_attention(out_path, num_images, num_slots, attrs, threads) as writer, \
            tqdm(total=num_images, desc=f"attention {rank}", disable=not progress) as bar:
        for ids, tokens, labels in batches:
            labels = labels.to(device)
            with mixed_precision(device):
                keys_values = model.image_keys_values(model.last_block_input(tokens.to(device).float()))
                columns, rivals = model.rival_columns(labels)
                rival_scores = model.forward_keys_values(keys_values, columns, chunk_size=chunk_size)
                predictions = model.best_rival(rival_scores.float(), columns, rivals)
                slots = torch.cat([labels[:, None], predictions[:, None], extra[labels]], dim=1)
                scores, attention = model.class_scores(None, slots.clamp(min=0), return_attention=True,
                                                       keys_values=keys_values)
            absent = slots < 0
            maps = attention[..., -grid[0] * grid[1]:].unflatten(-1, grid).masked_fill(absent[..., None, None, None], 0)
            writer.write(ids, *(to_host(t).numpy() for t in (labels, predictions,
                                                              scores.float().masked_fill(absent, float("nan")),
                                                              slots, maps.to(torch.float16))))
            bar.update(len(ids))
    return out_path


def map_statistics(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peak (x, y) in normalised [0, 1] image coordinates (patch centres) and spatial spread of maps [..., h, w].

    Spread: the attention-weighted root-mean-square distance from the map's centroid, in the same units.
    """
    h, w = maps.shape[-2:]
    flat = maps.reshape(*maps.shape[:-2], h * w).astype(np.float64)
    peak = flat.argmax(-1)
    peak_y, peak_x = (peak // w + 0.5) / h, (peak % w + 0.5) / w
    weights = flat / np.clip(flat.sum(-1, keepdims=True), 1e-12, None)
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    cy, cx = weights @ ys, weights @ xs
    spread = np.sqrt((weights * ((ys - cy[..., None]) ** 2 + (xs - cx[..., None]) ** 2)).sum(-1))
    return peak_x, peak_y, spread


HEADS_COLUMNS = {
    "image_id": "string", "rank": "string", "taxon": "string", "head": "int64", "removal_step": "int64",
    "score_before_removal": "float64", "score_after_removal": "float64", "is_trait_head": "bool",
    "peak_x": "float64", "peak_y": "float64", "spread": "float64", "prompt": "string",
    "margin_before_removal": "float64", "margin_after_removal": "float64", "contrast": "string",
    "score_drop_alone": "float64",
}


def mask_heads(
    model: PromptCAM,
    batches: Iterable[TokenBatch],
    attention_path: str | os.PathLike,
    rank: str,
    blur_mode: str = "uniform_patches",
    stopping: str = "prediction",
    top_k: int = 1,
    chunk_size: int | None = None,
    sibling_prompts: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """Greedy head masking (`taxotrait.masking`) on the correctly classified images whose class has a rival: one row
    per (image, candidate head), see HEADS_COLUMNS. An image of a monotypic taxon (no sibling under contrast
    'siblings') has nothing to be told from and no rows. Peaks and spread come from each head's own prompt's map.
    Runs on the model's device in float32 (the greedy choice compares scores of nearly equal candidates)."""
    device = model_device(model)
    with AttentionFile(attention_path) as attention:
        correct, row_of = attention.correct, attention.row_of
    has_rival = model.has_rival.cpu()
    frames = []
    for batch_ids, tokens, labels in tqdm(batches, desc=f"masking {rank}", disable=not progress):
        keep = torch.from_numpy(correct[[row_of[i] for i in batch_ids]]) & has_rival[labels]
        if not keep.any():
            continue
        result = to_host(greedy_head_masking(model, tokens[keep].to(device).float(), labels[keep].to(device),
                                             blur_mode, stopping, top_k, chunk_size, sibling_prompts))
        kept_ids = [i for i, k in zip(batch_ids, keep.tolist()) if k]
        frames.append(heads_frame(kept_ids, rank, model.class_names, result, model.contrast))
    if not frames:
        return empty_table(HEADS_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def heads_frame(image_ids, rank, class_names, result, contrast: str) -> pd.DataFrame:
    """Rows of heads.parquet for one batch of masking results (candidates of absent slots left out)."""
    num_images, size = result.removal_order.shape
    num_slots = result.prompts.shape[1]
    num_heads = size // num_slots
    step = result.removal_step
    margin_before = torch.cat([result.margin[:, None], result.margin_after[:, :-1]], dim=1)  # before each step
    peak_x, peak_y, spread = map_statistics(result.maps.float().cpu().numpy())  # [B, K, H] each
    names = np.array(class_names, dtype=object)
    prompts = result.prompts.cpu().numpy()
    frame = pd.DataFrame({
        "image_id": np.repeat(image_ids, size),
        "rank": rank,
        "taxon": np.repeat(names[result.classes.cpu().numpy()], size),
        "head": np.tile(np.arange(size) % num_heads, num_images),
        "removal_step": step.flatten().cpu().numpy(),
        "score_before_removal": result.score_before.gather(1, step).flatten().double().cpu().numpy(),
        "score_after_removal": result.score_after.gather(1, step).flatten().double().cpu().numpy(),
        "is_trait_head": result.is_trait.flatten().cpu().numpy(),
        "peak_x": peak_x.ravel(), "peak_y": peak_y.ravel(), "spread": spread.ravel(),
        "prompt": names[prompts.clip(min=0)].repeat(num_heads, axis=1).ravel(),
        "margin_before_removal": margin_before.gather(1, step).flatten().double().cpu().numpy(),
        "margin_after_removal": result.margin_after.gather(1, step).flatten().double().cpu().numpy(),
        "contrast": contrast,
        "score_drop_alone": result.drop_alone.flatten().double().cpu().numpy(),
    })
    frame = frame[result.present.flatten().cpu().numpy()]
    return frame.astype(HEADS_COLUMNS).reset_index(drop=True)
