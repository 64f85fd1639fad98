"""bf16 autocast, the precision every GPU run uses, exercised on the CPU: every model path runs in it and stays close
to float32 (CI has no GPU; this catches dtype mismatches between autocast and the explicit last-block attention)."""

import pytest
import torch
import torch.nn.functional as F

import taxotrait.train
from conftest import make_vit
from taxotrait.masking import greedy_head_masking
from taxotrait.token_cache import TokenCache, TokenDataset, build_token_cache
from taxotrait.train import TrainConfig, predict, top_k_accuracy, train
from test_data import AUGMENT, EVAL, make_model, one_thread, write_images  # noqa: F401 (autouse fixture)
from test_model import CLASSES, build


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def assert_close_to(value, reference, spread_of=None, share=0.05):
    """Within 1 % of each value plus `share` of the spread of `spread_of` (default: the reference): bf16 keeps 8 bits
    of mantissa."""
    scale = (reference if spread_of is None else spread_of).float().std().item()
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value.float(), reference.float(), atol=share * scale, rtol=0.01)


@pytest.mark.parametrize("variant,depth,reg_tokens", [("reference", 3, 0), ("scalable", 1, 0), ("scalable", 2, 1)])
def test_model_paths_under_bf16_autocast_match_float32(variant, depth, reg_tokens):
    model = build(variant, depth, make_vit(reg_tokens=reg_tokens), dtype=torch.float32)
    torch.manual_seed(5)
    images = torch.randn(4, 3, 32, 32)
    classes = torch.tensor([0, 3, 3, 1])
    blur = torch.zeros(4, len(CLASSES), 4, dtype=torch.bool)
    blur[:, :, 1] = True
    with torch.no_grad():
        tokens = model.frozen_tokens(images)
        full = model(images)
        blurred = model(images, blur=blur)
        maps = model.class_attention(images, torch.tensor([0, 3]))
        masking = greedy_head_masking(model, tokens, classes)
        with bf16():
            assert_close_to(model(images), full)
            assert_close_to(model.forward_tokens(tokens), full)
            assert_close_to(model(images, blur=blur), blurred)
            assert_close_to(model.class_attention(images, torch.tensor([0, 3])), maps)
            half = greedy_head_masking(model, model.frozen_tokens(images), classes)
        if variant == "scalable":
            with bf16():
                assert_close_to(model.forward_tokens(tokens, chunk_size=2), full)
                if depth == 1:
                    assert_close_to(model.forward_keys_values(model.image_keys_values(tokens)), full)
    assert_close_to(half.score, masking.score, spread_of=full)
    assert torch.equal(half.removal_order.sort(1).values, torch.arange(4).expand(4, 4))
    # the gradient reaches the prompts and the head, finite
    with bf16():
        loss = F.cross_entropy(model(images).float(), classes)
    loss.backward()
    used = [model.class_prompts, model.head.weight] + ([model.agnostic_prompts] if depth > 1 else [])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("depth", [1, 2])
def test_training_loop_learns_under_bf16_autocast(depth, images, tmp_path, monkeypatch):
    """The loop as it runs on CUDA (autocast on), here on the CPU: depth 1 through the kept keys/values, depth 2
    through the cached tokens."""
    monkeypatch.setattr(taxotrait.train, "mixed_precision", lambda device: bf16())
    paths, labels = images
    model = make_model(depth=depth)
    train_cache = build_token_cache(model, paths, tmp_path / "train.npy", views=2, augment=AUGMENT, progress=False)
    eval_cache = build_token_cache(model, paths, tmp_path / "eval.npy", augment=EVAL, progress=False)
    train_data, val_data = TokenDataset(TokenCache.open(train_cache), labels), TokenDataset(TokenCache.open(eval_cache), labels)
    config = TrainConfig(epochs=12, batch_size=8, lr=0.1, warmup_epochs=0.5, device="cpu")
    history = train(model, train_data, val_data, config, progress=False)
    assert history["loss"].iloc[-1] < 0.1 * history["loss"].iloc[0]
    assert history["val_top1"].iloc[-1] >= 0.9
    logits = predict(model, val_data)
    assert logits.dtype == torch.float32 and top_k_accuracy(logits, val_data.labels) >= 0.9
