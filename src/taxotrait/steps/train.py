"""Step of workflow/rules/train.smk: train one rank's Prompt-CAM on the cached tokens."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from ..checkpoint import atomic_save, checkpoint_payload
from ..data import derived_seed
from ..dataset import read_manifest_table
from ..devices import model_device
from ..distributed import DataParallel, launch
from ..io import write_parquet
from ..train import train as fit
from .common import backbone_of, rank_model, token_data, train_config, train_data

log = logging.getLogger("taxotrait")


def train_processes(processes: int | None, gpus: int = 0) -> int:
    """Processes of data-parallel training: `processes` (train.processes, the rule's `processes` resource) when set,
    else one per GPU the job was given (the rule's `gpu` resource) and CUDA sees."""
    if processes:
        return int(processes)
    return max(1, min(gpus, torch.cuda.device_count() if torch.cuda.is_available() else 0))


def train(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping, processes: int | None = None,
          gpus: int = 0, log_file: str | None = None, threads: int = 1) -> None:
    """Train the rank's PromptCAM (settings: `backbone`, `model`, `contrast`, `cache`, `augment` and the rank's
    `train`) on cached tokens, or on the images with `cache.train_tokens` false (decoded by `threads` - 1 worker
    processes); resumes from `train_state.pt` beside the model after an interruption (deleted once the model is
    written). With several processes (`train_processes`), data-parallel: this function runs in each
    (`taxotrait.distributed.launch`), the main one writes the outputs."""
    count = train_processes(processes, gpus)
    if count > 1 and not DataParallel().active:
        files = {"inputs": {k: str(inputs[k]) for k in ("manifest", "classes", "train_tokens", "eval_tokens")
                            if k in inputs},
                 "outputs": {k: str(outputs[k]) for k in ("model", "log_table")}}
        plain = settings.as_dict() if hasattr(settings, "as_dict") else dict(settings)
        launch("taxotrait.steps.train:train", count,
               {"rank": rank, "settings": plain, "threads": max(1, threads // count), **files}, log_file=log_file)
        return
    manifest = read_manifest_table(inputs["manifest"], ["path", "split", rank], ["train", "val"])
    classes = pd.read_parquet(inputs["classes"])
    config = train_config(settings["train"], settings["model"]["class_chunk"])
    if not settings["cache"]["train_tokens"]:
        config = replace(config, num_workers=max(0, threads - 1))
    backbone_of(settings)  # built (and cached) first, so that the seeded draws below are the model's own
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(config.seed, 0, 4))  # the initial head and prompts follow train.seed
        model = rank_model(settings, classes, rank)
    train_images = train_data(inputs, settings, model, manifest, classes, rank)
    val_data = None
    if (manifest["split"] == "val").any():
        val_data, _ = token_data(inputs["eval_tokens"], manifest, classes, rank, "val")
    state = Path(outputs["model"]).with_name("train_state.pt")
    history = fit(model, train_images, val_data, config, checkpoint_path=state, metadata={"rank": rank})
    if not DataParallel().is_main:
        return
    history["device"] = str(model_device(model))
    atomic_save(checkpoint_payload(model.cpu(), rank=rank), outputs["model"])
    write_parquet(history, outputs["log_table"])
    state.unlink(missing_ok=True)  # only an unfinished training keeps its state
