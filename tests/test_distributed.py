"""Data-parallel training (taxotrait.distributed) on CPU: 2 gloo processes, each with its half of every global batch,
end with the parameters of 1 process trained on the whole batches."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taxotrait.distributed import DataParallel, launch
from taxotrait.schema import with_defaults

HERE = Path(__file__).resolve().parent
CLASSES, IMAGES = 5, 17  # batches of 8: 8, 8, 1 -> shards 4/4, 4/4 and 1/0 (an empty share)
OPTIMIZERS = ("adamw", "sgd")


def write_data(folder: Path):
    """Images, the token cache of the tiny model, labels."""
    from taxotrait.data import AugmentConfig
    from taxotrait.token_cache import build_token_cache

    rng = np.random.default_rng(0)
    paths = []
    for i in range(IMAGES):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(paths[-1])
    cache = build_token_cache(tiny_model(), paths, folder / "tokens.npy", views=2,
                              augment=AugmentConfig(resize=36), progress=False)
    (folder / "labels.json").write_text(json.dumps(rng.integers(0, CLASSES, IMAGES).tolist()))
    return cache


def tiny_model():
    from conftest import make_vit
    from taxotrait.model import PromptCAM, PromptConfig

    torch.manual_seed(0)
    return PromptCAM(make_vit(), [f"taxon {c}" for c in range(CLASSES)], PromptConfig("scalable", 2, 2))


def train_here(folder: str, out: str) -> None:
    """Train the tiny model on the cache in `folder` with AdamW and with SGD (in one process, or as one rank of a
    group); every process saves its parameters and history to `<out>-<optimizer>.rank<rank>`."""
    from taxotrait.token_cache import TokenCache, TokenDataset
    from taxotrait.train import TrainConfig, train

    torch.set_num_threads(1)
    folder = Path(folder)
    labels = json.loads((folder / "labels.json").read_text())
    data = TokenDataset(TokenCache.open(folder / "tokens.npy"), labels)
    for optimizer in OPTIMIZERS:
        model = tiny_model()
        config = TrainConfig(epochs=3, batch_size=8, optimizer=optimizer, lr=0.05, weight_decay=1e-3,
                             prompt_init="cls_mean", device="cpu", label_smoothing=0.1)
        history = train(model, data, data, config, checkpoint_path=f"{out}-{optimizer}.state.pt", progress=False)
        torch.save({"params": model.trainable_state_dict(), "history": history.to_dict("list")},
                   f"{out}-{optimizer}.rank{DataParallel().rank}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    write_data(folder)
    return folder


def test_the_shards_cover_every_batch_once():
    parallel = DataParallel()
    assert not parallel.active and parallel.world == 1 and parallel.is_main
    batch = torch.arange(7)
    assert torch.equal(parallel.shard(batch), batch)
    shards = batch.tensor_split(2)  # what rank 0 and rank 1 of two take
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6]]


def test_two_processes_train_like_one(data, monkeypatch):
    train_here(str(data), str(data / "single"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch("test_distributed:train_here", 2, {"folder": str(data), "out": str(data / "ddp")}, cuda=False,
           timeout_s=120)
    for optimizer in OPTIMIZERS:
        single = torch.load(data / f"single-{optimizer}.rank0", weights_only=False)
        ranks = [torch.load(data / f"ddp-{optimizer}.rank{r}", weights_only=False) for r in range(2)]
        for name, value in single["params"].items():
            # both ranks hold the same parameters, those of one process on the whole batches
            assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), (optimizer, name)
            assert not torch.equal(value, tiny_model().trainable_state_dict()[name])  # it did train
            if name == "head.bias" and optimizer == "adamw":
                # a shift of every class score: its cross-entropy gradient is zero up to rounding, which AdamW
                # normalises into full steps, so it drifts by rounding noise in either run
                continue
            assert torch.allclose(ranks[0]["params"][name], value, atol=2e-5, rtol=1e-4), (optimizer, name)
        for column in ("loss", "train_top1", "val_top1"):
            assert np.allclose(ranks[0]["history"][column], single["history"][column], atol=1e-5), column
        assert (data / f"ddp-{optimizer}.state.pt").exists()  # written by the main process


def fail_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails")
    dist.barrier()  # rank 0 waits for a partner that is gone (gloo may notice, or the launcher stops it)
    time.sleep(600)


def test_a_failing_rank_stops_the_group(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"process\(es\) failed \(rank: exit code\) \{0: -?\d+, 1: -?\d+\}"):
        launch("test_distributed:fail_on_rank_one", 2, {}, cuda=False, timeout_s=120)
    assert time.monotonic() - start < 60


def test_the_train_step_runs_data_parallel_with_train_processes(tmp_path, monkeypatch):
    """The train step with train.processes = 2 (what a job with 2 GPUs does by itself) writes the model that one
    process writes."""
    import pandas as pd
    from safetensors.torch import save_file

    from taxotrait.steps import cache as cache_step
    from taxotrait.steps import train as train_step
    from taxotrait.backbone import create_backbone

    torch.manual_seed(0)
    weights = tmp_path / "vit.safetensors"
    save_file(create_backbone("vit_tiny_patch16_224", "random", 32).state_dict(), weights)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(15):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": str(i), "path": str(path), "split": "val" if i >= 11 else "train",
                     "species": f"s{i % 3}"})
    pd.DataFrame(rows).to_parquet(tmp_path / "manifest.parquet")
    pd.DataFrame({"rank": "species", "class_index": [0, 1, 2], "taxon": ["s0", "s1", "s2"], "parent": ""}
                 ).to_parquet(tmp_path / "classes.parquet")
    config = {"contrast": "siblings",
              "backbone": {"name": "vit_tiny_patch16_224", "weights": str(weights), "img_size": 32, "antialias": False},
              "model": {"variant": "scalable", "prompt_depth": 1, "num_prompts": 2, "class_chunk": None},
              "augment": {"resize": 36, "crop": True, "hflip": True, "views": 1},
              "train": {"epochs": 2, "batch_size": 4, "optimizer": "sgd", "lr": 0.05, "device": "cpu", "seed": 0,
                        "prompt_init": "cls_mean"}}
    with_defaults(config)
    inputs = {"manifest": str(tmp_path / "manifest.parquet"), "classes": str(tmp_path / "classes.parquet"),
              "train_tokens": str(tmp_path / "train.npy"), "eval_tokens": str(tmp_path / "eval.npy")}
    for kind in ("train", "eval"):
        cache_step.cache_tokens(kind, inputs["manifest"], inputs[f"{kind}_tokens"], config)
    models = {}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for processes in (1, 2):
        outputs = {"model": str(tmp_path / f"p{processes}" / "model.pt"),
                   "log_table": str(tmp_path / f"p{processes}" / "train_log.parquet")}
        train_step.train("species", inputs, outputs, config, processes=processes, log_file=str(tmp_path / "train.log"))
        models[processes] = torch.load(outputs["model"], weights_only=True)["state_dict"]
        assert pd.read_parquet(outputs["log_table"])["epoch"].tolist() == [1, 2]
        assert not (tmp_path / f"p{processes}" / "train_state.pt").exists()
    for name, value in models[1].items():
        assert torch.allclose(models[2][name], value, atol=2e-5, rtol=1e-4), name
    assert "rank 0" in (tmp_path / "train.log").read_text()  # the main process logged to the rule's log
    assert train_step.train_processes(None, gpus=4) == (min(4, torch.cuda.device_count())
                                                        if torch.cuda.is_available() else 1)
    assert train_step.train_processes(3, gpus=4) == 3
