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


def train_species(root, config, inputs, streamed: bool, threads: int = 1) -> pd.DataFrame:
    out = root / ("streamed" if streamed else "cached")
    inputs = dict(inputs)
    if streamed:
        config = {**config, "cache": {"train_tokens": False}}
    else:
        inputs["train_tokens"] = root / "train.tokens.npy"
        if not inputs["train_tokens"].exists():
            cache_step.cache_tokens("train", inputs["manifest"], inputs["train_tokens"], config)
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


def test_the_workflow_plans_no_training_token_cache_when_streaming(prepared):
    """The train rule's inputs and settings: no train.tokens.npy, and the images' transform passed instead."""
    from taxotrait.steps import rule_settings

    _, config, _ = prepared
    streamed = {**config, "cache": {"train_tokens": False}}
    assert rule_settings(streamed, ["cache"]) != rule_settings(config, ["cache"])
