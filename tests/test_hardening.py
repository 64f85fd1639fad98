"""Hardening: bad images and tables, interrupted and failed runs, safe loading.

Workflow-level checks (a rerun after a killed train job, what a changed parameter re-runs) are in test_workflow.py,
where the finished tiny run is.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from taxotrait import figures
from taxotrait.backbone import BackboneWeightsError, create_backbone, read_state_dict, weights_digest
from taxotrait.checkpoint import FORMAT, CheckpointError, load_official_checkpoint, read_checkpoint
from taxotrait.data import AugmentConfig, ImageTransform, load_image
from taxotrait.dataset import (
    ImageError, check_image, prepare_dataset, prepare_files, read_manifest, scan_image_tree,
)
from taxotrait.errors import ConfigError, DatasetError
from taxotrait.extract import extract_attention
from taxotrait.io import atomic_outputs, atomic_write
from taxotrait.runner import apply_image_limit
from taxotrait.schema import with_defaults
from taxotrait.token_cache import TokenCache, TokenDataset, build_token_cache
from taxotrait.train import TrainConfig, train
from taxotrait.steps import attention, cache, common, evaluate, masking
from taxotrait.steps import figures as figure_steps
from taxotrait.steps import train as train_step
from taxotrait.steps import traits as trait_steps
from test_data import AUGMENT, make_model, one_thread, write_images  # noqa: F401 (autouse fixture: one thread)

REPO = Path(__file__).resolve().parents[1]
RANKS = ["order", "genus", "species"]


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- bad images
def test_unusable_files_are_rejected_with_a_reason(tmp_path):
    Image.fromarray(noise(30, 40)).save(tmp_path / "good.jpg", quality=90)
    Image.fromarray(noise(30, 40)).save(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("a text file with an image extension\n")
    for name in ("good.jpg", "good.png"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut{Path(name).suffix}").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (7, 50)).save(tmp_path / "thin.png")
    Image.new("RGB", (8, 8), (0, 90, 200)).save(tmp_path / "tiny.png")
    reasons = {"empty.jpg": "empty file (0 bytes)", "text.png": "not an image", "cut.jpg": "cannot decode",
               "cut.png": "cannot decode", "thin.png": "too small: 7x50 pixels", "absent.png": "file not found"}
    for name, reason in reasons.items():
        assert check_image(str(tmp_path / name)).startswith(reason), name
        with pytest.raises(ImageError, match=re.escape(f"{tmp_path / name}: {reason}")):
            load_image(tmp_path / name)  # the loader says the same, naming the file
    assert check_image(str(tmp_path / "good.jpg")) is None and check_image(str(tmp_path / "tiny.png")) is None
    # 8 px is enough: images smaller than the model input are upscaled by the transform
    x = ImageTransform(32, ((0,) * 3, (1,) * 3), AugmentConfig(36, False, False))(load_image(tmp_path / "tiny.png"))
    assert x.shape == (3, 32, 32) and torch.allclose(x[:, 16, 16], torch.tensor([0, 90, 200]) / 255, atol=0.01)


def test_every_mode_becomes_rgb_with_the_right_pixels(tmp_path):
    """One decision for every file (dataset.read_image): the loader and the check agree, pixel values are right."""
    grey16 = np.repeat(np.array([[0, 25700, 1000, 65535]], np.uint16), 8, axis=0).repeat(2, axis=1)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")  # a 16-bit PNG: 'I;16'
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:, :4] = [200, 10, 10, 0]  # transparent: its hidden colour must not show
    rgba[:, 4:8] = [200, 10, 10, 255]
    rgba[:, 8:] = [0, 0, 0, 128]
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([np.full((8, 8), 50, np.uint8), np.zeros((8, 8), np.uint8)])).convert("LA").save(
        tmp_path / "la.png")
    palette = Image.fromarray(np.repeat([[0, 1]], 8, axis=0).astype(np.uint8).repeat(4, axis=1), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.save(tmp_path / "palette_transparent.png", transparency=0)
    palette.save(tmp_path / "palette.gif")
    cmyk = Image.new("CMYK", (12, 8))
    for i, ink in enumerate([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)]):
        cmyk.paste(ink, (4 * i, 0, 4 * i + 4, 8))
    cmyk.save(tmp_path / "cmyk.tif")
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "grey.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.png")
    expected = {  # file: [(column, RGB)]
        "grey16.png": [(0, (0, 0, 0)), (2, (100, 100, 100)), (4, (4, 4, 4)), (7, (255, 255, 255))],  # /257, rounded
        "rgba.png": [(0, (255, 255, 255)), (5, (200, 10, 10)), (10, (127, 127, 127))],  # composited onto white
        "la.png": [(3, (255, 255, 255))],
        "palette_transparent.png": [(0, (255, 255, 255)), (6, (0, 255, 0))],
        "palette.gif": [(0, (255, 0, 0)), (6, (0, 255, 0))],
        "cmyk.tif": [(1, (0, 255, 255)), (5, (0, 0, 0)), (9, (255, 255, 255))],
        "cmyk.jpg": [(1, (0, 255, 255)), (5, (0, 0, 0)), (9, (255, 255, 255))],
        "grey.png": [(3, (77, 77, 77))],
        "bw.png": [(3, (255, 255, 255))],
    }
    for name, pixels in expected.items():
        assert check_image(str(tmp_path / name)) is None, name
        image = load_image(tmp_path / name)
        assert image.mode == "RGB", name
        tolerance = 3 if name.endswith(".jpg") else 1
        for column, rgb in pixels:
            assert np.abs(np.asarray(image)[4, column].astype(int) - rgb).max() <= tolerance, (name, column)
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tif")
    assert check_image(str(tmp_path / "float.tif")).startswith("unsupported image mode F")


@pytest.mark.parametrize("orientation,turns", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
    pixels = np.zeros((16, 24, 3), np.uint8)
    pixels[:8, :8] = 255  # a white top-left block as stored
    exif = Image.Exif()
    exif[0x0112] = orientation  # a real EXIF orientation tag, as a camera writes it
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "photo.jpg")).astype(int)
    assert np.abs(upright - np.rot90(pixels, turns)).mean() < 5  # rotated as a viewer shows it
    assert check_image(str(tmp_path / "photo.jpg")) is None


def test_decompression_bomb_limit_rejects_and_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (30, 40, 50):  # 900 px: fine; 1600 px: PIL would only warn; 2500 px: PIL's own error
        Image.new("RGB", (side, side)).save(tmp_path / f"{side}.png")
    assert check_image(str(tmp_path / "30.png")) is None
    for side in (40, 50):
        assert re.match(r"too large: .*\d+ pixels.*data\.max_image_pixels", check_image(str(tmp_path / f"{side}.png")))
        with pytest.raises(ImageError, match="too large"):
            load_image(tmp_path / f"{side}.png")
    apply_image_limit({"data": {"max_image_pixels": 3000}})  # what every workflow step does with the config
    assert Image.MAX_IMAGE_PIXELS == 3000 and check_image(str(tmp_path / "50.png")) is None


def test_rejects_table_and_the_allowed_share(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "test"):
        for species in ("s1", "s2"):
            (root / split / species).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(noise(10, 12, i)).save(root / split / species / f"{i}.png")
    (root / "train" / "s1" / "0.png").write_bytes(b"")
    images = scan_image_tree(root).assign(order="O", genus="G")
    manifest, _, rejects = prepare_dataset(images, None, RANKS, "tree", max_reject_fraction=1 / 12, progress=False)
    assert len(manifest) == 11 and rejects.to_dict("records") == [
        {"path": str(root / "train" / "s1" / "0.png"), "image_id": "train/s1/0", "reason": "empty file (0 bytes)"}]
    with pytest.raises(DatasetError, match=r"1 of 12 images rejected, more than the allowed 5\.0% "
                                           r"\(data\.max_reject_fraction\).*0\.png: empty file"):
        prepare_dataset(images, None, RANKS, "tree", max_reject_fraction=0.05, progress=False)
    every = images.assign(path=str(root / "train" / "s1" / "0.png")).head(1)
    with pytest.raises(DatasetError, match="none of the 1 images can be used"):
        prepare_dataset(every, None, RANKS, "tree", max_reject_fraction=1.0, progress=False)


# ----------------------------------------------------------------------------------------------- bad tables
def test_duplicate_paths_and_paths_leaving_the_manifest_folder(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        Image.fromarray(noise(10, 10)).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "m.csv").write_text("image_id,path,split,order,genus,species\n"
                                    "x,images/a.png,train,O,G,s\ny,images/b.png,train,O,G,s\n"
                                    "z,images/./a.png,test,O,G,s\n")
    with pytest.raises(DatasetError, match=r"m\.csv: image '.*images/a\.png' is listed more than once \(rows \[2, 4\]"):
        prepare_dataset(read_manifest(tmp_path / "m.csv"), None, RANKS, str(tmp_path / "m.csv"), progress=False)
    (tmp_path / "sub").mkdir()
    for column, value in (("path", "../images/a.png"), ("mask_path", "masks/../../../etc/passwd")):
        row = {"path": "a.png", "split": "train", "species": "s", "mask_path": "m.npz", column: value}
        (tmp_path / "sub" / "m.csv").write_text(",".join(row) + "\n" + ",".join(row.values()) + "\n")
        with pytest.raises(DatasetError, match=rf"m\.csv: row 2 {column} '{re.escape(value)}' leaves the manifest's "
                                               r"folder .*use an absolute path"):
            read_manifest(tmp_path / "sub" / "m.csv")
    (tmp_path / "ok.csv").write_text(f"path,split,species\nimages/../images/a.png,train,s\n{tmp_path}/images/b.png,"
                                     "test,s\n")
    assert read_manifest(tmp_path / "ok.csv")["path"].tolist() == [str(tmp_path / "images/../images/a.png"),
                                                                   str(tmp_path / "images/b.png")]
    same_id = pd.DataFrame({"path": [str(tmp_path / p / "train/s/a.png") for p in ("u", "v")], "split": "train",
                            "order": "O", "genus": "G", "species": "s"})
    with pytest.raises(DatasetError, match="duplicate image_id 'train/s/a'.*add an image_id column"):
        prepare_dataset(same_id, None, RANKS, "m", progress=False)
    with pytest.raises(DatasetError, match="m: no images listed"):
        prepare_dataset(same_id.iloc[:0], None, RANKS, "m", progress=False)


SPECIES = {  # species: order, genus, colour of its images
    "Pica pica é": ("Ordo Ä", "Genus ß", (230, 30, 30)),
    "Pica pica è": ("Ordo Ä", "Genus ß", (30, 30, 230)),  # the same file name as the one above once sanitised
    "Ursus ü": ("Ordo Ö", "Genus ø 2", (30, 220, 40)),
}


def test_non_ascii_names_and_spaces_end_to_end_without_a_val_split(tmp_path, monkeypatch):
    """Taxon names and paths with spaces and accents through every step (tables, token caches, training without a
    validation split, HDF5 attributes, figure file names); a split without images is a clear error; and a writer
    that fails leaves no partial file."""
    root, out = tmp_path / "données brutes", tmp_path / "résultats"
    rows = ["order,genus,species"]
    for k, (species, (order, genus, colour)) in enumerate(SPECIES.items()):
        rows.append(f"{order},{genus},{species}")
        for split, n in (("train", 4), ("test", 2)):
            (root / split / species).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + noise(40, 48, 10 * k + i).astype(int) // 8 - 16, 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / species / f"photo {i} ñ.png")
    (tmp_path / "taxonomie ä.csv").write_text("\n".join(rows) + "\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(ranks=RANKS, rank_overrides={}, contrast="rank")  # one genus per order: nothing to contrast there
    config["data"] = {"synthetic": None, "images": str(root), "manifest": None,
                      "taxonomy": str(tmp_path / "taxonomie ä.csv"), "max_reject_fraction": 0.0}
    config["backbone"] = {"name": "vit_tiny_patch16_224", "weights": "random", "img_size": 32, "antialias": False}
    config["augment"] = {"resize": 36, "crop": False, "hflip": False, "views": 1}
    config["train"].update(epochs=12, batch_size=4, lr=0.05, warmup_epochs=0.5, device="cpu")
    config["attention"] = {"split": "test", "extra_classes": 1, "batch_size": 4}
    config["figures"] = {"gallery_images": 2, "max_heads": 2}
    with_defaults(config)
    tables = {key: out / f"{key}.parquet" for key in ("manifest", "classes", "rejects")}
    prepare_files({"taxonomy": config["data"]["taxonomy"]}, tables, config["data"], config["ranks"])
    inputs = {"manifest": tables["manifest"], "classes": tables["classes"],
              "train_tokens": out / "cache" / "train.tokens.npy", "eval_tokens": out / "cache" / "eval.tokens.npy"}
    for kind in ("train", "eval"):
        cache.cache_tokens(kind, tables["manifest"], inputs[f"{kind}_tokens"], config)
    for rank in RANKS:  # every rank: top-down prediction at the species rank reads the coarser ranks' models
        folder = out / rank
        inputs.update(model=folder / "model.pt", attention=folder / "attention.h5")
        train_step.train(rank, inputs, {"model": folder / "model.pt", "log_table": folder / "train_log.parquet"},
                         config)
    inputs["models"] = [out / rank / "model.pt" for rank in RANKS]
    assert pd.read_parquet(folder / "train_log.parquet")["val_top1"].isna().all()  # trained without validation
    evaluate.evaluate(inputs, {"metrics": [out / rank / "metrics.parquet" for rank in RANKS]}, config)
    assert set(pd.read_parquet(folder / "metrics.parquet")["split"]) == {"test"}
    attention.extract_attention("species", inputs, {"attention": folder / "attention.h5"}, config)
    with h5py.File(folder / "attention.h5") as h5:
        assert list(h5["class_names"].asstr()[:]) == sorted(SPECIES)
        assert "test/Pica pica é/photo 1 ñ" in set(h5["image_id"].asstr()[:])
    masking.mask_heads("species", inputs, {"heads": folder / "heads.parquet"}, config)
    trait_steps.traits({"heads": folder / "heads.parquet", "manifest": tables["manifest"]},
                       {"traits": folder / "traits.parquet", "key_entries": folder / "key.parquet"}, config)
    traits = pd.read_parquet(folder / "traits.parquet")
    assert set(traits["taxon"]) == set(SPECIES)  # every species classified right on some image
    figure_steps.figures("species", {"attention": folder / "attention.h5", "traits": folder / "traits.parquet",
                                     "manifest": tables["manifest"]}, {"figures": folder / "figures"}, config)
    assert sorted(p.name for p in (folder / "figures").glob("*.png")) == [
        "gallery_Pica_pica__.png", "gallery_Pica_pica___2.png", "gallery_Ursus__.png", "shared_traits.png"]
    # a split without images
    config["attention"]["split"] = "val"
    with pytest.raises(ConfigError, match="attention.split: the dataset has no val images.*set attention.split"):
        attention.extract_attention("species", inputs, {"attention": folder / "val.h5"}, config)

    # writers that fail half-way leave neither a partial file nor a temporary one
    def broken_to_parquet(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half a table")
        raise OSError("disk full")

    failed = tmp_path / "failed"
    with monkeypatch.context() as patch:
        patch.setattr(pd.DataFrame, "to_parquet", broken_to_parquet)
        config["attention"]["split"] = "test"
        for step in (
            lambda: prepare_files({"taxonomy": config["data"]["taxonomy"]},
                                  {key: failed / f"{key}.parquet" for key in tables}, config["data"], config["ranks"]),
            lambda: train_step.train("species", inputs, {"model": folder / "model_again.pt",
                                                         "log_table": failed / "train_log.parquet"}, config),
            lambda: evaluate.evaluate(inputs, {"metrics": [failed / f"{rank}.parquet" for rank in RANKS]}, config),
            lambda: masking.mask_heads("species", inputs, {"heads": failed / "heads.parquet"}, config),
            lambda: trait_steps.traits({"heads": folder / "heads.parquet", "manifest": tables["manifest"]},
                                       {"traits": failed / "traits.parquet",
                                        "key_entries": failed / "key.parquet"}, config),
        ):
            with pytest.raises(OSError, match="disk full"):
                step()
    model = common.trained_model(folder / "model.pt", config)

    def batches_then_crash():
        yield ["a"], torch.zeros(1, *TokenCache.open(inputs["eval_tokens"]).tokens.shape[2:]), torch.tensor([0])
        raise OSError("killed")

    with pytest.raises(OSError, match="killed"):
        extract_attention(model, batches_then_crash(), 6, failed / "attention.h5", "species", progress=False)
    with pytest.raises(ImageError, match="absent.png: file not found"):
        build_token_cache(model, [root / "train" / "Ursus ü" / "photo 0 ñ.png", failed / "absent.png"],
                          failed / "tokens.npy", progress=False)
    with monkeypatch.context() as patch:
        save = Image.Image.save

        def broken_save(self, fp, *args, **kwargs):
            if not isinstance(fp, (str, os.PathLike)):
                return save(self, fp, *args, **kwargs)  # matplotlib's PNG in memory
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError("disk full")

        patch.setattr(Image.Image, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            figures.save_figure(figures.new_figure(1, 1), failed / "figure.png")
    assert list(failed.iterdir()) == []


# ------------------------------------------------------------------------------------------ interrupted runs
def test_atomic_write_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "new folder" / "table.parquet"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".table.parquet.tmp")
        tmp.write_text("v1")
    assert target.read_text() == "v1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_text("half of v2")
            raise KeyboardInterrupt
    assert target.read_text() == "v1" and [p.name for p in target.parent.iterdir()] == ["table.parquet"]
    outputs = {"summary": tmp_path / "summary.md", "pointing": tmp_path / "pointing.parquet"}  # a rule's outputs
    with pytest.raises(OSError):
        with atomic_outputs(outputs) as temporary:
            temporary["summary"].write_text("done")
            raise OSError("the second one failed")
    assert not outputs["summary"].exists() and not outputs["pointing"].exists()
    with atomic_outputs(outputs) as temporary:
        for path in temporary.values():
            path.write_text("done")
    assert outputs["summary"].read_text() == outputs["pointing"].read_text() == "done"


CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from test_data import make_model
from taxotrait.token_cache import TokenCache, TokenDataset
from taxotrait.train import TrainConfig, train


class PausedInEpochTwo(TokenDataset):
    # after the first optimiser step of epoch 2, signal and wait to be killed
    epoch, batches = None, 0

    def set_epoch(self, epoch, seed=0):
        self.epoch = epoch
        super().set_epoch(epoch, seed)

    def __getitems__(self, items):
        if self.epoch == 2:
            self.batches += 1
            if self.batches == 2:
                Path(sys.argv[4]).touch()
                time.sleep(600)
        return super().__getitems__(items)


data = PausedInEpochTwo(TokenCache.open(sys.argv[2]), json.loads(sys.argv[6]))
train(make_model(), data, config=TrainConfig(**json.loads(sys.argv[5])), checkpoint_path=sys.argv[3], progress=False)
"""


def test_training_killed_mid_epoch_resumes_to_the_same_parameters(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    paths, labels = write_images(tmp_path / "images")
    cache = build_token_cache(make_model(), paths, tmp_path / "train.npy", views=2, augment=AUGMENT, progress=False)
    config = TrainConfig(epochs=3, batch_size=8, optimizer="adamw", lr=0.01, schedule="cosine", prompt_init="cls_mean",
                         seed=3, device="cpu")
    state, paused = tmp_path / "train_state.pt", tmp_path / "paused"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(cache), str(state),
                              str(paused), json.dumps(asdict(config)), json.dumps(labels)],
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        while not paused.exists():
            assert child.poll() is None, "the training process ended before it could be killed"
            assert time.monotonic() < deadline, "the training process never reached epoch 2"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)  # mid-epoch 2: one step of it taken, in memory only
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert read_checkpoint(state)["training"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written checkpoint

    resumed = make_model()  # a rerun: a new process, the same state file
    with caplog.at_level(logging.INFO, logger="taxotrait.train"):
        history = train(resumed, TokenDataset(TokenCache.open(cache), labels), config=config, checkpoint_path=state,
                        progress=False)
    assert "resuming" in caplog.text and "after epoch 1" in caplog.text and history["epoch"].tolist() == [1, 2, 3]
    whole = make_model()
    train(whole, TokenDataset(TokenCache.open(cache), labels), config=config, progress=False)
    for name, value in whole.trainable_state_dict().items():
        assert torch.equal(resumed.trainable_state_dict()[name], value), name


# ------------------------------------------------------------------------------------------------ safe loading
def _touch(path):
    Path(path).touch()


class Trap:
    """Unpickling it would run code (create a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _touch, (self.path,)


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    ran = tmp_path / "code_ran"
    torch.save({"format": FORMAT, "state_dict": {}, "note": Trap(str(ran))}, tmp_path / "model.pt")
    torch.save({"model_state_dict": {"head.weight": torch.zeros(1)}, "extra": Trap(str(ran))}, tmp_path / "authors.pt")
    torch.save({"state_dict": {"pos_embed": torch.zeros(1)}, "extra": Trap(str(ran))}, tmp_path / "weights.pth")
    refused = r"refused: the file holds an object of type test_hardening\._touch.*never unpickles"
    with pytest.raises(CheckpointError, match=r"model\.pt: " + refused):
        read_checkpoint(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"authors\.pt: " + refused):
        load_official_checkpoint(tmp_path / "authors.pt", "vit_tiny_patch16_224")
    with pytest.raises(BackboneWeightsError, match=r"weights\.pth: " + refused):
        read_state_dict(tmp_path / "weights.pth")
    assert not ran.exists()


def test_every_torch_load_is_weights_only():
    calls = []
    for source in sorted((REPO / "src" / "taxotrait").glob("*.py")):
        text = source.read_text()
        calls += [(source.name, text[m.start(): text.index(")", m.start()) + 1])
                  for m in re.finditer(r"torch\.load\(", text)]
        assert "allow_pickle=True" not in text and "pickle.load(" not in text, source.name
    assert calls and all("weights_only=True" in call for _, call in calls), calls


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset, empty hub caches, and every connection attempt fails (and is recorded)."""
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    probes = []

    def unreachable(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    create_model = timm.create_model

    def no_download(name, pretrained=False, **kwargs):
        assert not pretrained, "timm was asked to download"
        return create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    return probes


def test_backbone_download_without_network_fails_at_once(no_network, monkeypatch):
    with pytest.raises(BackboneWeightsError, match=r"'vit_small_patch16_224\.dino'.*huggingface\.co is not reachable.*"
                       r"download https://huggingface\.co/timm/vit_small_patch16_224\.dino/resolve/main/model\."
                       r"safetensors.*set `backbone\.weights`"):
        create_backbone("vit_small_patch16_224.dino")
    assert no_network == [(("huggingface.co", 443), 3.0)]  # one quick probe, no download attempt
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneWeightsError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        create_backbone("vit_small_patch16_224.dino")
    assert len(no_network) == 1  # offline: not even a probe


def test_backbone_weights_in_the_hub_cache_need_no_network(no_network, tmp_path):
    name = "vit_tiny_patch16_224.augreg_in21k"
    source = create_backbone(name, "random", 224)
    repo = tmp_path / "hub" / f"models--timm--{name}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, repo / "snapshots/abc123/model.safetensors")
    cached = create_backbone(name, None, 224)
    assert weights_digest(cached) == weights_digest(source) and no_network == []


def test_cuda_requested_without_one_names_the_setting(monkeypatch):
    from taxotrait.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    for key in ("train.device", "evaluation.device"):
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}: cuda requested but no CUDA device is available"):
            resolve_device("cuda", key)
