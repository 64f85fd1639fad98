"""Batched greedy head masking against the naive per-candidate forward."""

import pytest
import torch

from conftest import make_vit
from taxotrait.masking import greedy_head_masking
from taxotrait.naive import naive_forward, naive_greedy_head_masking
from test_model import build


@pytest.mark.parametrize("blur_mode", ["uniform_patches", "zero_logits"])
@pytest.mark.parametrize("variant,depth", [("reference", 3), ("scalable", 1), ("scalable", 2)])
def test_batched_equals_naive(variant, depth, blur_mode):
    model = build(variant, depth, make_vit(reg_tokens=1, img_size=32))
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    classes = torch.tensor([0, 3, 3, 1])
    result = greedy_head_masking(model, model.frozen_tokens(images), classes, blur_mode, chunk_size=2)
    order, after = naive_greedy_head_masking(model, images, classes, blur_mode)
    assert torch.equal(result.removal_order, order)
    assert torch.allclose(result.score_after, after, atol=1e-10)
    # every head is removed exactly once, and removal_step inverts removal_order
    assert torch.equal(result.removal_order.sort(1).values, torch.arange(4).expand(4, 4))
    assert torch.equal(result.removal_order.gather(1, result.removal_step), torch.arange(4).expand(4, 4))
    full, _ = naive_forward(model, images)
    assert torch.allclose(result.score, full[torch.arange(4), classes], atol=1e-10)
    other = full.clone()
    other[torch.arange(4), classes] = float("-inf")
    assert torch.allclose(result.runner_up, other.max(1).values, atol=1e-10)


def test_greedy_keeps_the_score_highest():
    model = build("scalable", 1)
    torch.manual_seed(4)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    result = greedy_head_masking(model, model.frozen_tokens(images), torch.tensor([2, 2]))
    # step 0: the chosen head's blur leaves the highest score among all single-head blurs
    singles = torch.stack([model(images, classes=torch.tensor([2]), blur=torch.eye(4, dtype=torch.bool)[h].expand(2, 1, 4))[:, 0]
                           for h in range(4)], 1)
    assert torch.allclose(result.score_after[:, 0], singles.max(1).values)
    assert torch.equal(result.removal_order[:, 0], singles.argmax(1))
    # what each head adds to the score: the score with it alone blurred, taken from the full score
    assert torch.allclose(result.drop_alone[:, :4], result.score[:, None] - singles)
