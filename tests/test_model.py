"""PromptCAM against the slow, obviously-correct implementation of the equations."""

import pytest
import torch

from conftest import make_vit
from taxotrait.model import PromptCAM, PromptConfig
from taxotrait.naive import naive_forward

CLASSES = [f"taxon_{i}" for i in range(5)]


def build(variant="scalable", depth=1, vit=None, num_prompts=3, dtype=torch.float64):
    torch.manual_seed(2)
    model = PromptCAM(vit or make_vit(), CLASSES, PromptConfig(variant, depth, num_prompts))
    with torch.no_grad():  # a trained-looking head and prompts far from init
        model.class_prompts.normal_()
        model.head.weight.normal_()
        model.agnostic_prompts.normal_()
    return model.to(dtype)


VARIANTS = [
    ("reference", 3, make_vit),
    ("scalable", 1, make_vit),
    ("scalable", 2, make_vit),
    ("scalable", 3, lambda: make_vit(reg_tokens=2)),
    ("scalable", 1, lambda: make_vit(layer_scale=None)),
]


@pytest.mark.parametrize("variant,depth,factory", VARIANTS)
def test_forward_and_attention_equal_naive(variant, depth, factory, images):
    model = build(variant, depth, factory())
    x = images.double()
    scores, attention = naive_forward(model, x)
    assert scores.shape == (3, len(CLASSES))
    assert torch.allclose(model(x), scores, atol=1e-10, rtol=0)
    raw = model.class_attention(x, torch.arange(len(CLASSES)), raw=True)
    assert torch.allclose(raw, attention, atol=1e-12)
    maps = model.class_attention(x, torch.tensor([4, 0]))
    assert maps.shape == (3, 2, 4, 4, 4)  # B, K, heads, h, w
    assert torch.allclose(maps[:, 0].flatten(-2), attention[:, 4, :, -16:])


def test_reference_variant_matches_in_float32(images):
    model = build("reference", 3, dtype=torch.float32)
    assert torch.allclose(model(images), naive_forward(model, images)[0], atol=1e-5)


def test_reference_variant_is_the_authors_layout():
    model = build("reference", 99)
    assert model.prompt_config == PromptConfig("reference", 3, len(CLASSES))
    assert model.agnostic_prompts.shape == (2, len(CLASSES), 32)
    assert model.joint_class_attention


def test_scalable_classes_are_independent_and_chunkable(images):
    model = build("scalable", 2)
    x = images.double()
    full = model(x)
    assert torch.allclose(model(x, chunk_size=2), full, atol=1e-12)
    picked = torch.tensor([[3, 1], [0, 0], [4, 2]])
    assert torch.allclose(model(x, classes=picked), full.gather(1, picked), atol=1e-12)
    # Another class set must not change a class's score (independence), unlike the joint reference variant.
    smaller = PromptCAM(model.backbone, CLASSES[:2], model.prompt_config).double()
    smaller.load_state_dict({**model.state_dict(), "class_prompts": model.class_prompts[:2]})
    assert torch.allclose(smaller(x), full[:, :2], atol=1e-12)


def test_reference_classes_interact(images):
    model = build("reference", 3)
    x = images.double()
    before = model(x)[:, 0]
    with torch.no_grad():
        model.class_prompts[1] = torch.randn(32, dtype=torch.float64)  # (a constant shift would vanish in LN)
    assert (model(x)[:, 0] - before).abs().max() > 1e-6  # float64: far above rounding


def test_cached_tokens_give_the_same_logits(images):
    model = build("scalable", 2)
    x = images.double()
    tokens = model.frozen_tokens(x)
    assert tokens.shape == (3, 17, 32)
    assert not tokens.requires_grad
    assert torch.allclose(model.forward_tokens(tokens), model(x), atol=1e-12)


@pytest.mark.parametrize("blur_mode", ["uniform_patches", "zero_logits"])
@pytest.mark.parametrize("variant,depth", [("reference", 3), ("scalable", 2)])
def test_blurred_heads_equal_naive(variant, depth, blur_mode, images):
    model = build(variant, depth, make_vit(reg_tokens=1))
    x = images.double()
    blur = torch.rand(3, len(CLASSES), 4, generator=torch.Generator().manual_seed(0)) < 0.5
    expected, _ = naive_forward(model, x, blur, blur_mode)
    got = model(x, blur=blur, blur_mode=blur_mode)
    assert torch.allclose(got, expected, atol=1e-10)
    assert not torch.allclose(got, model(x))


def test_only_prompts_and_head_train(images):
    model = build("scalable", 2, dtype=torch.float32)
    model.train()
    assert not model.backbone.training
    model(images).logsumexp(1).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"agnostic_prompts", "class_prompts", "head.weight", "head.bias"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    assert set(model.trainable_state_dict()) == trainable


def test_bad_configuration_names_the_key():
    with pytest.raises(ValueError, match="prompt_depth"):
        PromptCAM(make_vit(), CLASSES, PromptConfig("scalable", 7))
    with pytest.raises(ValueError, match="variant"):
        PromptCAM(make_vit(), CLASSES, PromptConfig("deep"))
