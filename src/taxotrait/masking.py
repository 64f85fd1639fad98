"""Greedy head masking: which attention heads of a class prompt carry the traits that make the class win.

For an image and class c, repeatedly blur (make uniform) the head, among those not yet blurred, whose blurring
leaves s[c] highest, until every head is blurred; the removal order and the score after each step are recorded. The
heads still unblurred when one more removal would change the prediction from c are the class's trait heads.

Batched: the image tokens entering the last block are computed once; each step then scores every candidate head of
every image in one pass over the class-c row of the last block only (no full forward per candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import PromptCAM

STOPPING = ("prediction", "top_k")


@dataclass
class MaskingResult:
    """Greedy head masking of B images, H heads, each for its own class.

    removal_order [B, H]: head removed at each step. score_after [B, H]: s[c] after each step's removal.
    removal_step [B, H]: the step at which each head was removed. is_trait [B, H]: the class's trait heads.
    score [B]: s[c] with no head blurred. runner_up [B]: the best score of any other class.
    """

    classes: torch.Tensor
    removal_order: torch.Tensor
    score_after: torch.Tensor
    removal_step: torch.Tensor
    is_trait: torch.Tensor
    score: torch.Tensor
    runner_up: torch.Tensor


def trait_heads(score_after: torch.Tensor, removal_step: torch.Tensor, runner_up: torch.Tensor,
                stopping: str = "prediction", top_k: int = 1) -> torch.Tensor:
    """Which heads are trait heads [B, H], given the greedy removal record.

    ``prediction`` (the paper): the heads left just before the first removal that would let another class win (s[c]
    below `runner_up`); at least the last head. ``top_k``: the last `top_k` heads in removal order.
    """
    num_heads = score_after.shape[1]
    if stopping == "top_k":
        if not 1 <= top_k <= num_heads:
            raise ValueError(f"top_k must be in 1..{num_heads}, got {top_k}")
        first_kept = torch.full_like(runner_up, num_heads - top_k, dtype=torch.long)
    elif stopping == "prediction":
        flips = score_after < runner_up[:, None]
        first_kept = torch.where(flips.any(1), flips.float().argmax(1), num_heads - 1)
    else:
        raise ValueError(f"stopping must be one of {STOPPING}, got {stopping!r}")
    return removal_step >= first_kept[:, None]


@torch.no_grad()
def greedy_head_masking(
    model: PromptCAM,
    tokens: torch.Tensor,
    classes: torch.Tensor,
    blur_mode: str = "uniform_patches",
    stopping: str = "prediction",
    top_k: int = 1,
    chunk_size: int | None = None,
) -> MaskingResult:
    """Greedy head masking of each image for its class, batched over images and candidate heads.

    tokens: frozen tokens [B, T, D] (`PromptCAM.frozen_tokens`); classes: [B] class index per image. chunk_size
    bounds the classes scored at once when computing the runner-up score.
    """
    image_tokens = model.last_block_input(tokens)
    all_scores, _ = model.class_scores(image_tokens, chunk_size=chunk_size)
    batch = torch.arange(len(classes), device=classes.device)
    score = all_scores[batch, classes]
    runner_up = all_scores.scatter(1, classes[:, None], float("-inf")).max(1).values

    queries = model.class_prompts[classes].to(image_tokens.dtype)[:, None]  # [B, 1, D]
    q, k, v = model.class_queries_keys_values(model.image_keys_values(image_tokens), queries)
    attention = model.attention_weights(q, k)  # [B, H, 1, keys]
    kept = (attention @ v)[:, :, 0]  # per-head outputs [B, H, d]
    blurred = model.uniform_row(attention, blur_mode) @ v  # [B, H, d]

    num_images, num_heads = kept.shape[:2]
    candidates = torch.eye(num_heads, dtype=torch.bool, device=kept.device)  # candidate j blurs head j
    removed = torch.zeros(num_images, num_heads, dtype=torch.bool, device=kept.device)
    removal_order = torch.empty(num_images, num_heads, dtype=torch.long, device=kept.device)
    score_after = torch.empty(num_images, num_heads, dtype=score.dtype, device=kept.device)
    for step in range(num_heads):
        blur = removed[:, None, :] | candidates  # [B, candidate, head]
        mixed = torch.where(blur[..., None], blurred[:, None], kept[:, None])  # [B, candidate, head, d]
        scores = model.scores_from_head_outputs(queries, mixed.transpose(1, 2))  # [B, candidate]
        best = scores.masked_fill(removed, float("-inf")).argmax(1)
        removal_order[:, step] = best
        score_after[:, step] = scores[batch, best]
        removed[batch, best] = True

    removal_step = removal_order.argsort(1)
    return MaskingResult(
        classes=classes,
        removal_order=removal_order,
        score_after=score_after,
        removal_step=removal_step,
        is_trait=trait_heads(score_after, removal_step, runner_up, stopping, top_k),
        score=score,
        runner_up=runner_up,
    )
