"""The training loop: learning, exact resumption, checkpoints, divergence, schedules."""

import dataclasses
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from taxotrait.checkpoint import model_from_payload, read_checkpoint
from taxotrait.data import ImageDataset, ImageTransform
from taxotrait.token_cache import TokenCache, TokenDataset, build_token_cache
from taxotrait.train import (
    TrainConfig, TrainingDiverged, init_class_prompts, learning_rate, predict, top_k_accuracy, train,
)
from test_data import AUGMENT, EVAL, make_model, one_thread, write_images  # noqa: F401 (autouse fixture)

FAST = TrainConfig(epochs=4, batch_size=8, optimizer="sgd", lr=0.1, warmup_epochs=1.0, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def caches(images, tmp_path_factory):
    """(augmented 2-view training cache, eval cache) of the depth-2 model, in fp32 (compared with image training)."""
    folder, model = tmp_path_factory.mktemp("cache"), make_model()
    train_cache = build_token_cache(model, images[0], folder / "train.npy", views=2, augment=AUGMENT, progress=False,
                                    precision="fp32")
    eval_cache = build_token_cache(model, images[0], folder / "eval.npy", augment=EVAL, progress=False,
                                   precision="fp32")
    return TokenCache.open(train_cache), TokenCache.open(eval_cache)


def trainable(model):
    return model.trainable_state_dict()


@pytest.mark.parametrize("path", ["tokens", "images"])
def test_learns_a_small_problem(path, images, caches):
    paths, labels = images
    model = make_model()
    if path == "tokens":
        train_data, val_data = TokenDataset(caches[0], labels), TokenDataset(caches[1], labels)
    else:
        train_data = ImageDataset(paths, labels, ImageTransform.for_model(model, AUGMENT))
        val_data = ImageDataset(paths, labels, ImageTransform.for_model(model, EVAL))
    config = TrainConfig(epochs=12, batch_size=8, lr=0.1, warmup_epochs=0.5, device="cpu")
    history = train(model, train_data, val_data, config, progress=False)
    assert list(history.columns) == ["epoch", "lr", "loss", "train_top1", "val_top1", "seconds"]
    assert history.dtypes["epoch"] == np.int64 and (history.dtypes.drop("epoch") == np.float64).all()
    assert history["epoch"].tolist() == list(range(1, 13))
    assert history["loss"].iloc[-1] < 0.1 * history["loss"].iloc[0]
    assert history["train_top1"].iloc[-1] >= 0.9 and history["val_top1"].iloc[-1] >= 0.9
    assert top_k_accuracy(predict(model, val_data), val_data.labels) == history["val_top1"].iloc[-1]


def interrupt_at(monkeypatch, cls, epoch):
    """Make `cls.set_epoch` raise when training reaches `epoch` (a crash after epoch - 1 was saved)."""
    original = cls.set_epoch

    def set_epoch(self, e, seed=0):
        if e == epoch:
            raise KeyboardInterrupt(f"killed before epoch {e}")
        original(self, e, seed)

    monkeypatch.setattr(cls, "set_epoch", set_epoch)


@pytest.mark.parametrize("path,optimizer,schedule,init", [
    ("tokens", "sgd", "cosine", "uniform"),
    ("tokens", "adamw", "onecycle", "cls_mean"),
    ("images", "adamw", "cosine", "uniform"),
])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(path, optimizer, schedule, init, images, caches,
                                                             tmp_path, monkeypatch):
    paths, labels = images
    config = TrainConfig(epochs=4, batch_size=8, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01,
                         schedule=schedule, prompt_init=init, warmup_epochs=1.5, seed=3, device="cpu")
    cls = TokenDataset if path == "tokens" else ImageDataset

    def data(model):
        if path == "tokens":
            return TokenDataset(caches[0], labels)
        return ImageDataset(paths, labels, ImageTransform.for_model(model, AUGMENT))

    model_a = make_model()
    history_a = train(model_a, data(model_a), config=config, checkpoint_path=tmp_path / "a.pt", progress=False)

    model_b, state = make_model(), tmp_path / "b.pt"
    with monkeypatch.context() as patch:
        interrupt_at(patch, cls, 3)
        with pytest.raises(KeyboardInterrupt):
            train(model_b, data(model_b), config=config, checkpoint_path=state, progress=False)
    assert read_checkpoint(state)["training"]["epoch"] == 2
    assert not all(torch.equal(v, trainable(model_a)[k]) for k, v in trainable(model_b).items())

    model_b = make_model()  # a fresh process: new model, same checkpoint
    history_b = train(model_b, data(model_b), config=config, checkpoint_path=state, progress=False)
    for name, value in trainable(model_a).items():
        assert torch.equal(trainable(model_b)[name], value), name
    pd.testing.assert_frame_equal(history_b.drop(columns="seconds"), history_a.drop(columns="seconds"))

    # A finished run returns at once, with the trained parameters.
    model_c = make_model()
    with monkeypatch.context() as patch:
        interrupt_at(patch, cls, 4)
        history_c = train(model_c, data(model_c), config=config, checkpoint_path=state, progress=False)
    pd.testing.assert_frame_equal(history_c, history_b)
    assert all(torch.equal(trainable(model_c)[k], v) for k, v in trainable(model_a).items())


def test_checkpoint_is_safe_and_rebuilds_the_model(images, caches, tmp_path):
    labels = images[1]
    model = make_model()
    history = train(model, TokenDataset(caches[0], labels), TokenDataset(caches[1], labels), FAST,
                    checkpoint_path=tmp_path / "m.pt", progress=False, metadata={"rank": "genus"})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    training = payload["training"]
    assert training["epoch"] == 4 and training["config"]["optimizer"] == "sgd"
    assert payload["metadata"] == {"rank": "genus"}
    pd.testing.assert_frame_equal(pd.DataFrame(training["history"]), history)
    group = training["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-3
    assert all("momentum_buffer" in s for s in training["optimizer"]["state"].values())
    rebuilt = model_from_payload(read_checkpoint(tmp_path / "m.pt"), make_model().backbone)
    tokens = torch.from_numpy(caches[1].tokens[:, 0].astype(np.float32))
    expected = model.forward_tokens(tokens)
    assert torch.equal(rebuilt.forward_tokens(tokens), expected)
    assert not torch.allclose(make_model().forward_tokens(tokens), expected, atol=1e-3)  # training changed it
    torch.testing.assert_close(predict(model, TokenDataset(caches[1], labels), batch_size=5), expected.detach())


def test_another_config_starts_afresh(images, caches, tmp_path, caplog):
    labels = images[1]
    data = TokenDataset(caches[0], labels)
    train(make_model(), data, config=FAST, checkpoint_path=tmp_path / "m.pt", progress=False)
    other = dataclasses.replace(FAST, lr=0.05, epochs=2)
    model, fresh = make_model(), make_model()
    with caplog.at_level(logging.INFO, logger="taxotrait.train"):
        history = train(model, data, config=other, checkpoint_path=tmp_path / "m.pt", progress=False)
    assert "starting afresh" in caplog.text and history["epoch"].tolist() == [1, 2]
    train(fresh, data, config=other, progress=False)
    assert all(torch.equal(trainable(fresh)[k], v) for k, v in trainable(model).items())
    assert read_checkpoint(tmp_path / "m.pt")["training"]["config"]["lr"] == 0.05


def test_token_and_image_training_agree_on_the_same_view(images, caches):
    paths, labels = images
    model = make_model()
    tokens = TokenDataset(caches[1], labels)
    pictures = ImageDataset(paths, labels, ImageTransform.for_model(model, EVAL))
    torch.testing.assert_close(predict(model, tokens), predict(model, pictures), atol=2e-3, rtol=1e-3)

    def gradients(forward, x, y):
        model.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    batch = [0, 9, 17, 23]
    from_tokens = gradients(model.forward_tokens, *tokens.__getitems__(batch))
    from_images = gradients(model, *pictures.__getitems__(batch))
    for name, grad in from_tokens.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, from_images[name], atol=1e-3, rtol=1e-2)
    model_t, model_i = make_model(), make_model()
    train(model_t, tokens, config=FAST, progress=False)
    train(model_i, pictures, config=FAST, progress=False)
    for name, value in trainable(model_t).items():
        torch.testing.assert_close(value, trainable(model_i)[name], atol=2e-3, rtol=1e-2)


def test_divergence_stops_and_keeps_the_last_good_epoch(images, caches, tmp_path, monkeypatch):
    labels = images[1]
    state = {"epoch": None}
    set_epoch, getitems = TokenDataset.set_epoch, TokenDataset.__getitems__

    def poisoned_set_epoch(self, epoch, seed=0):
        state["epoch"] = epoch
        set_epoch(self, epoch, seed)

    def poisoned_getitems(self, items):
        x, y = getitems(self, items)
        return (x * math.nan if state["epoch"] == 3 else x), y

    monkeypatch.setattr(TokenDataset, "set_epoch", poisoned_set_epoch)
    monkeypatch.setattr(TokenDataset, "__getitems__", poisoned_getitems)
    model = make_model()
    with pytest.raises(TrainingDiverged, match=r"nan at epoch 3 .*last good epoch 2 \(lr [0-9.e-]+\).*m\.pt"):
        train(model, TokenDataset(caches[0], labels), config=FAST, checkpoint_path=tmp_path / "m.pt", progress=False)
    payload = read_checkpoint(tmp_path / "m.pt")
    assert payload["training"]["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in payload["state_dict"].values())


def test_exploding_parameters_are_never_saved(images, caches, tmp_path):
    config = TrainConfig(epochs=3, batch_size=8, optimizer="adamw", lr=1e30, warmup_epochs=0, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"epoch 1\b.*no epoch completed"):
        train(make_model(), TokenDataset(caches[0], images[1]), config=config, checkpoint_path=tmp_path / "m.pt",
              progress=False)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_learning_rate_warms_up_linearly_then_decays(schedule, images, caches):
    config = TrainConfig(epochs=10, lr=0.2, schedule=schedule, warmup_epochs=0.5)
    lr = [learning_rate(config, 8, step) for step in range(80)]  # 8 steps per epoch, warmup 4 steps
    assert lr[:5] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])
    middle = 4 + 38  # halfway through the 76 decay steps
    assert lr[middle] == pytest.approx(0.1)
    if schedule == "cosine":
        assert lr[4 + 19] == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    else:
        assert lr[4 + 19] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(lr[4:], lr[5:])) and 0 < lr[-1] < 0.003
    # The loop follows it: the history's lr is that of each epoch's last step (24 images, batch 8: 3 steps).
    run = TrainConfig(epochs=3, batch_size=8, lr=0.2, schedule=schedule, warmup_epochs=2, device="cpu")
    history = train(make_model(), TokenDataset(caches[0], images[1]), config=run, progress=False)
    assert history["lr"].tolist() == pytest.approx([learning_rate(run, 3, s) for s in (2, 5, 8)])
    assert history["lr"].tolist()[:2] == pytest.approx([0.1, 0.2])


def test_cls_mean_initialisation(images, caches):
    model = make_model()
    data = TokenDataset(caches[0], images[1])
    init_class_prompts(model, data, noise=0.0, seed=0, batch_size=5)
    x, _ = data.__getitems__(range(len(data)))
    cls = model.last_block_input(x)[:, 0]
    for prompt in model.class_prompts:
        torch.testing.assert_close(prompt, cls.mean(0), atol=1e-5, rtol=1e-5)
    init_class_prompts(model, data, noise=0.5, seed=0)
    spread = (model.class_prompts - cls.mean(0)).std().item()
    assert 0.3 * cls.std().item() < spread < 0.7 * cls.std().item()


def test_predict_chunks_and_top_k(images, caches):
    model = make_model()
    data = TokenDataset(caches[1], images[1])
    full = predict(model, data)
    assert full.shape == (24, 3) and full.dtype == torch.float32
    torch.testing.assert_close(predict(model, data, chunk_size=2), full)
    torch.testing.assert_close(predict(model, data, classes=torch.tensor([2, 0])), full[:, [2, 0]])
    logits = torch.tensor([[0.1, 0.5, 0.2], [0.9, 0.0, 0.3], [0.2, 0.3, 0.1]])
    labels = torch.tensor([2, 0, 2])
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, labels, 5) == 1.0


def test_depth_one_training_keeps_keys_and_values(images, tmp_path, monkeypatch):
    """At prompt depth 1 the last block's image keys/values are frozen: kept once (the training and the validation
    images), they give the same training and validation."""
    from taxotrait.train import KeyValueDataset

    paths, labels = images
    model = make_model(depth=1)
    cache = TokenCache.open(build_token_cache(model, paths, tmp_path / "t.npy", views=2, augment=AUGMENT, progress=False))
    data = TokenDataset(cache, labels)
    kept = KeyValueDataset(data, model, batch_size=8)
    data.set_epoch(3, seed=0)
    kept.set_epoch(3, seed=0)
    tokens, y = data.__getitems__([5, 1, 20])
    keys_values, y_kept = kept.__getitems__([5, 1, 20])
    assert torch.equal(y, y_kept)
    torch.testing.assert_close(keys_values, model.image_keys_values(tokens), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(model.forward_keys_values(keys_values), model.forward_tokens(tokens), atol=2e-3, rtol=1e-3)

    val = TokenDataset(cache, labels[:10], np.arange(10))
    built, build = [], KeyValueDataset.__init__
    monkeypatch.setattr(KeyValueDataset, "__init__", lambda self, d, *a, **k: built.append(len(d)) or build(self, d, *a, **k))
    models, histories = [make_model(depth=1), make_model(depth=1)], []
    for model, gb in zip(models, (4.0, 0.0)):  # 0 GB: recompute from the tokens every step
        histories.append(train(model, data, val, config=dataclasses.replace(FAST, keys_values_gb=gb), progress=False))
    assert built == [len(data), len(val)]  # both sets' keys/values kept at 4 GB, none at 0 GB
    assert histories[0]["val_top1"].tolist() == histories[1]["val_top1"].tolist()
    kept_run, recomputed_run = trainable(models[0]), trainable(models[1])
    for name, value in kept_run.items():
        torch.testing.assert_close(value, recomputed_run[name], atol=2e-3, rtol=1e-2)
    # the kept keys/values are float16: bit-identical results would mean they were not used
    assert not all(torch.equal(value, recomputed_run[name]) for name, value in kept_run.items())
