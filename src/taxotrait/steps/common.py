"""What several steps share (as common.smk does for the rules): the backbone and models their settings describe, the
device of the model steps and the cached tokens of a split."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import fields

import pandas as pd
import torch

from ..backbone import create_backbone
from ..checkpoint import load_checkpoint
from ..data import AugmentConfig, ImageDataset, ImageTransform
from ..token_cache import TokenCache, TokenDataset
from ..dataset import class_names, class_parents, labels, read_manifest_table
from ..devices import resolve_device
from ..errors import ConfigError
from ..model import PromptCAM, PromptConfig
from ..train import TrainConfig


@functools.lru_cache(maxsize=2)
def _backbone(name: str, weights: str | None, img_size: int, antialias: bool):
    return create_backbone(name, weights, img_size, antialias)


def backbone_of(settings: Mapping):
    """The frozen backbone described by `settings['backbone']` (built once per process)."""
    b = settings["backbone"]
    return _backbone(b["name"], b["weights"], b["img_size"], b["antialias"])


def new_model(settings: Mapping, names: list[str], parents: list[str] | None = None) -> PromptCAM:
    """An untrained PromptCAM for `names` on the configured backbone (`backbone`, `model`); with `parents` (contrast
    'siblings') each class competes only with the classes of its parent."""
    m = settings["model"]
    prompts = PromptConfig(m["variant"], m["prompt_depth"], m["num_prompts"])
    return PromptCAM(backbone_of(settings), names, prompts, backbone_name=settings["backbone"]["name"],
                     class_parents=parents)


def rank_model(settings: Mapping, classes: pd.DataFrame, rank: str) -> PromptCAM:
    """An untrained PromptCAM for the classes of `rank`, with the configured contrast (`contrast`)."""
    parents = class_parents(classes, rank) if settings["contrast"] == "siblings" else None
    return new_model(settings, class_names(classes, rank), parents)


def trained_model(path, settings: Mapping, device: torch.device | None = None) -> PromptCAM:
    """The checkpoint at `path` on the configured backbone, in eval mode, on `device` (default: the CPU)."""
    return load_checkpoint(path, backbone=backbone_of(settings)).eval().to(device or "cpu")


def model_step_device(settings: Mapping) -> torch.device:
    """The device of the model steps (cache_tokens, train, evaluate, extract_attention, mask_heads): `train.device`
    (a rank's rule passes the rank's, its override applied)."""
    return resolve_device(settings["train"]["device"], "train.device")


def train_config(settings: Mapping, class_chunk: int) -> TrainConfig:
    """The TrainConfig of a rank's `train` settings."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(class_chunk=class_chunk, **{k: v for k, v in settings.items() if k in known})


def token_data(cache_path, manifest: pd.DataFrame, classes: pd.DataFrame, rank: str, split: str | None):
    """TokenDataset of the manifest rows of `split` (all if None) at `rank`, plus their manifest rows."""
    cache = TokenCache.open(cache_path)
    rows = manifest if split is None else manifest[manifest["split"] == split]
    return TokenDataset(cache, labels(rows, classes, rank).to_numpy(), cache.index(rows["path"])), rows


def train_data(inputs: Mapping, settings: Mapping, model: PromptCAM, manifest: pd.DataFrame,
               classes: pd.DataFrame, rank: str):
    """The training images of `rank` as the model step sees them: their cached tokens (`inputs['train_tokens']`), or
    with `cache.train_tokens` false the images themselves, decoded and augmented anew each epoch (`augment`), the
    frozen forward running on them in the step."""
    if settings["cache"]["train_tokens"]:
        return token_data(inputs["train_tokens"], manifest, classes, rank, "train")[0]
    rows, a = manifest[manifest["split"] == "train"], settings["augment"]
    transform = ImageTransform.for_model(model, AugmentConfig(a["resize"], a["crop"], a["hflip"]))
    return ImageDataset(rows["path"].tolist(), labels(rows, classes, rank).to_numpy(), transform)


def eval_batches(inputs: Mapping, settings: Mapping, rank: str):
    """(a factory of (ids, tokens, labels) batches, number of images, classes table) of `attention.split`, in batches
    of `attention.batch_size`."""
    split, classes = settings["attention"]["split"], pd.read_parquet(inputs["classes"])
    rows = read_manifest_table(inputs["manifest"], ["image_id", "path", rank], [split])
    if rows.empty:
        present = read_manifest_table(inputs["manifest"], ["split"])["split"]
        raise ConfigError(f"attention.split: the dataset has no {split} images ({inputs['manifest']}); set "
                          f"attention.split to a split that has images ({', '.join(sorted(set(present)))})")
    data, _ = token_data(inputs["eval_tokens"], rows, classes, rank, None)
    ids, size = rows["image_id"].tolist(), settings["attention"]["batch_size"]

    def batches():
        for start in range(0, len(ids), size):
            tokens, truth = data.__getitems__(range(start, min(start + size, len(ids))))
            yield ids[start:start + size], tokens, truth

    return batches, len(ids), classes
