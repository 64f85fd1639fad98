"""`cache.train_tokens: false`: training runs the frozen forward over the training images each epoch instead of
reading cache/train.tokens.npy (for a token cache that would not fit a disk budget), on the CPU at tiny size."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from taxotrait.dataset import prepare_files
from taxotrait.schema import defaults
from taxotrait.steps import cache as cache_step
from taxotrait.steps import train as train_step

COLOURS = {"Aus bus": (200, 40, 40), "Aus cus": (40, 200, 40), "Dus eus": (40, 40, 200), "Dus fus": (200, 200, 40)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Four species in two genera as a user's image tree, prepared; a config of a tiny random ViT without
    augmentation (so that a streamed epoch sees what the token cache holds)."""
    root = tmp_path_factory.mktemp("stream")
    for k, (species, colour) in enumerate(COLOURS.items()):
        for split, n in (("train", 6), ("val", 2)):
            (root / "images" / split / species).mkdir(parents=True)
            for i in range(n):
                noise = np.random.default_rng(100 * k + i).integers(-30, 30, (40, 40, 3))
                Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(
                    root / "images" / split / species / f"{i}.png")
    (root / "taxonomy.csv").write_text("genus,species\n" + "".join(f"{s.split()[0]},{s}\n" for s in COLOURS))
    config = defaults()
    config.update(ranks=["genus", "species"])
    config["data"].update(synthetic=None, images=str(root / "images"), taxonomy=str(root / "taxonomy.csv"))
    config["backbone"].update(name="vit_tiny_patch16_224", weights="random", img_size=32)
    config["augment"].update(resize=32, crop=False, hflip=False)
    config["train"].update(epochs=2, batch_size=8, device="cpu", prompt_init="uniform")
    tables = {key: root / f"{key}.parquet" for key in ("manifest", "classes", "rejects")}
    prepare_files({"taxonomy": config["data"]["taxonomy"]}, tables, config["data"], config["ranks"])
    inputs = {"manifest": tables["manifest"], "classes": tables["classes"], "eval_tokens": root / "eval.tokens.npy"}
    cache_step.cache_tokens("eval", inputs["manifest"], inputs["eval_tokens"], config)
    return root, config, inputs


def with_train_tokens(root, config, inputs) -> dict:
    """`inputs` with the training token cache, made on first use."""
    path = root / "train.tokens.npy"
    if not path.exists():
        cache_step.cache_tokens("train", inputs["manifest"], path, config)
    return {**inputs, "train_tokens": path}


def train_species(root, config, inputs, streamed: bool, threads: int = 1) -> pd.DataFrame:
    out = root / ("streamed" if streamed else "cached")
    if streamed:
        config = {**config, "cache": {"train_tokens": False}}
    else:
        inputs = with_train_tokens(root, config, inputs)
    train_step.train("species", inputs, {"model": out / "model.pt", "log_table": out / "log.parquet"}, config,
                     threads=threads)
    assert (out / "model.pt").exists()
    return pd.read_parquet(out / "log.parquet")


def test_streamed_training_follows_the_cached_one(prepared):
    """Without augmentation a streamed epoch sees the images the cache holds (at float32 instead of float16): the
    same losses and accuracies epoch by epoch; no training token cache is read or written."""
    root, config, inputs = prepared
    cached = train_species(root, config, inputs, streamed=False)
    streamed = train_species(root, config, inputs, streamed=True, threads=2)  # one decoding worker
    assert not (root / "streamed" / "train.tokens.npy").exists()
    np.testing.assert_allclose(streamed["loss"], cached["loss"], rtol=2e-3)
    assert streamed["train_top1"].tolist() == cached["train_top1"].tolist()
    assert streamed["val_top1"].tolist() == cached["val_top1"].tolist()


def test_streamed_probes_are_the_cached_ones(prepared):
    """train_probes without a training token cache: the training images' features come from the images themselves,
    the same probe as from the cache (no augmentation, one view) up to the cache's float16."""
    import torch

    from taxotrait.steps import evaluation as evaluation_step

    root, config, inputs = prepared
    config = {**config, "evaluation": {**config["evaluation"], "device": "cpu"}}
    cached = with_train_tokens(root, config, inputs)
    probes = {}
    for name, (step_inputs, step_config) in {"cached": (cached, config),
                                             "streamed": (inputs, {**config, "cache": {"train_tokens": False}})}.items():
        paths = [root / f"probes_{name}" / rank / "probe.pt" for rank in config["ranks"]]
        evaluation_step.train_probes(step_inputs, {"probes": paths}, step_config)
        probes[name] = [torch.load(path, weights_only=True) for path in paths]
    for cached_probe, streamed_probe in zip(probes["cached"], probes["streamed"]):
        assert cached_probe["metadata"]["top1"] == streamed_probe["metadata"]["top1"]
        for key, value in cached_probe["state_dict"].items():
            torch.testing.assert_close(streamed_probe["state_dict"][key], value, atol=2e-3, rtol=2e-2)
