"""Greedy head masking: which attention heads carry the traits that make a class win against its rivals.

For an image of class c, the candidate heads are those of c's prompt and, under contrast 'siblings', of its best
sibling prompts too (`rival_prompts`). Repeatedly blur (make uniform) the candidate head whose blurring leaves the
margin s[c] - max(rivals' scores) highest, until every candidate is blurred; the removal order, each step's margin
and the scores are recorded. The heads still unblurred when one more removal would let a rival win (the margin
drops below 0) are the trait heads: of c's own prompt (evidence for c) or of a sibling's (the sibling's prompt
looking for its own trait, absent here: the "mark yellow / mark not yellow" couplet of a key). Under contrast
'rank' (the paper) the rivals are every other class and only c's prompt is a candidate, so the margin's change is
the change of s[c].

Batched: the image tokens entering the last block are computed once; each step scores every candidate head of every
image in one pass over the candidates' rows of the last block only (no full forward per candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import PromptCAM, attention_weights

STOPPING = ("prediction", "top_k")


@dataclass
class MaskingResult:
    """Greedy head masking of B images over K prompt slots of H heads each; candidate j is head j % H of slot j // H.

    classes [B]: each image's class. prompts [B, K]: the class of each slot (slot 0: the image's class; then rival
    classes whose heads are candidates too; -1 where an image has fewer). removal_order [B, K*H]: the candidate
    removed at each step (absent slots' candidates last). margin_after [B, K*H]: the margin after each step;
    score_before / score_after [B, K*H]: the removed head's own prompt score before and after its step.
    removal_step [B, K*H]: the step of each candidate. is_trait [B, K*H]: the trait heads. drop_alone [B, K*H]: how
    much blurring the candidate alone (no other head blurred) lowers its own prompt's score: what the head adds to
    its prompt's score on the image, the strength with which it fires there. margin [B]: the margin with no head
    blurred. score [B]: s[c] with no head blurred. runner_up [B]: the best rival's score. maps
    [B, K, H, h, w]: the slots' attention over the patch grid.
    """

    classes: torch.Tensor
    prompts: torch.Tensor
    removal_order: torch.Tensor
    margin_after: torch.Tensor
    score_before: torch.Tensor
    score_after: torch.Tensor
    removal_step: torch.Tensor
    is_trait: torch.Tensor
    drop_alone: torch.Tensor
    margin: torch.Tensor
    score: torch.Tensor
    runner_up: torch.Tensor
    maps: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        """bool [B, K*H]: candidates of a slot that exists."""
        heads = self.removal_order.shape[1] // self.prompts.shape[1]
        return (self.prompts >= 0).repeat_interleave(heads, dim=1)


def trait_heads(margin_after: torch.Tensor, removal_step: torch.Tensor, num_present: torch.Tensor,
                stopping: str = "prediction", top_k: int = 1) -> torch.Tensor:
    """Which candidates are trait heads [B, K*H], given the greedy removal record of `num_present` [B] candidates.

    ``prediction`` (the paper): the heads left just before the first removal that would let a rival win (the margin
    below 0); at least the last head. ``top_k``: the last `top_k` heads in removal order.
    """
    steps = torch.arange(margin_after.shape[1], device=margin_after.device)
    if stopping == "top_k":
        if not 1 <= top_k <= int(num_present.min()):
            raise ValueError(f"top_k must be in 1..{int(num_present.min())}, got {top_k}")
        first_kept = num_present - top_k
    elif stopping == "prediction":
        flips = (margin_after < 0) & (steps[None] < num_present[:, None])
        first_kept = torch.where(flips.any(1), flips.float().argmax(1), num_present - 1)
    else:
        raise ValueError(f"stopping must be one of {STOPPING}, got {stopping!r}")
    return (removal_step >= first_kept[:, None]) & (removal_step < num_present[:, None])


def rival_prompts(model: PromptCAM, scores: torch.Tensor, others: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count]: the columns of each image's `count` best-scoring rivals among `others` [B, R] (columns of `scores`
    [B, R]; -1 where it has fewer) whose heads are masking candidates beside its own class's; none under contrast
    'rank' (the paper)."""
    if model.contrast == "rank" or count == 0:
        return torch.full((len(scores), 0), -1, dtype=torch.long, device=scores.device)
    best = scores.masked_fill(~others, float("-inf")).topk(min(count, scores.shape[1]), dim=1)
    return torch.where(torch.isfinite(best.values), best.indices, -1)


@torch.no_grad()
def greedy_head_masking(
    model: PromptCAM,
    tokens: torch.Tensor,
    classes: torch.Tensor,
    blur_mode: str = "uniform_patches",
    stopping: str = "prediction",
    top_k: int = 1,
    chunk_size: int | None = None,
    sibling_prompts: int = 2,
) -> MaskingResult:
    """Greedy head masking of each image for its class against its rivals, batched over images and candidates.

    tokens: frozen tokens [B, T, D] (`PromptCAM.frozen_tokens`); classes: [B] class index per image. Only each image's
    class and its rivals are scored (its siblings under contrast 'siblings': O(B x siblings) prompts through the last
    block). chunk_size bounds the classes scored at once. sibling_prompts: under contrast 'siblings', how many of the
    best-scoring siblings' prompts have candidate heads too (`rival_prompts`).
    """
    image_tokens = model.last_block_input(tokens)
    keys_values = model.image_keys_values(image_tokens)
    # each image's class and its rivals only (`PromptCAM.rival_columns`): the full rank under contrast 'rank'
    columns, others = model.rival_columns(classes)
    rival_scores = model.class_scores(None, columns, chunk_size=chunk_size, keys_values=keys_values)[0]  # [B, R]
    columns, own = model.own_columns(columns, classes)  # own: the column of each image's class
    batch = torch.arange(len(classes), device=classes.device)
    others[batch, own] = False  # the classes each image's class competes with
    slots = torch.cat([own[:, None], rival_prompts(model, rival_scores, others, sibling_prompts)], dim=1)  # columns
    present = slots >= 0  # [B, K]
    prompts = torch.where(present, columns.gather(1, slots.clamp(min=0)), -1)
    fixed = others.clone()
    fixed[batch[:, None], slots.clamp(min=0)] &= ~present  # rivals whose heads are not candidates keep their score
    rival_fixed = rival_scores.masked_fill(~fixed, float("-inf")).max(1).values  # [B]

    queries = model.class_prompts[prompts.clamp(min=0)].to(image_tokens.dtype)  # [B, K, D]
    q, k, v = model.class_queries_keys_values(keys_values, queries)
    attention = attention_weights(model.backbone.blocks[-1], q, k)  # [B, H, K, keys]
    kept = (attention @ v).transpose(1, 2)  # per-head outputs [B, K, H, d]
    blurred = model.uniform_row(attention, blur_mode) @ v  # [B, H, d]
    grid = model.grid_size(image_tokens.shape[1])
    maps = attention[..., -grid[0] * grid[1]:].transpose(1, 2).unflatten(-1, grid)  # [B, K, H, h, w]

    num_images, num_slots, num_heads = kept.shape[:3]
    current = rival_scores.gather(1, slots.clamp(min=0)).masked_fill(~present, float("-inf"))  # [B, K]
    candidates = torch.eye(num_heads, dtype=torch.bool, device=kept.device)  # candidate h blurs head h
    removed = torch.zeros(num_images, num_slots, num_heads, dtype=torch.bool, device=kept.device)
    not_self = ~torch.eye(num_slots, dtype=torch.bool, device=kept.device)[None]  # [1, K, K]
    size = num_slots * num_heads
    removal_order = torch.empty(num_images, size, dtype=torch.long, device=kept.device)
    margin_after, score_before, score_after = (torch.empty(num_images, size, dtype=current.dtype,
                                                           device=kept.device) for _ in range(3))
    flat_queries = queries.repeat_interleave(num_heads, dim=1)  # [B, K*H, D]

    def margins(own: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """own - the best of `others` and the fixed rivals, per image (leading dimension)."""
        return own - torch.maximum(others, rival_fixed.view(-1, *[1] * (others.dim() - 1)))

    margin = current[:, 0] - torch.cat([current[:, 1:], rival_fixed[:, None]], dim=1).max(1).values
    absent = ~present.repeat_interleave(num_heads, dim=1)  # candidates of slots an image does not have
    for step in range(size):
        blur = removed[:, :, None, :] | candidates  # [B, K, candidate, head]
        mixed = torch.where(blur[..., None], blurred[:, None, None], kept[:, :, None])  # [B, K, cand, H, d]
        scores = model.scores_from_head_outputs(flat_queries, mixed.flatten(1, 2).transpose(1, 2))
        scores = scores.view(num_images, num_slots, num_heads)  # each candidate's new score of its own slot
        if step == 0:
            drop_alone = (current[:, :, None] - scores).flatten(1)
        # the best other slot when slot k changes: slot 0 against slots 1.., slot k >= 1 against the others
        sibling = current.clone()
        sibling[:, 0] = float("-inf")
        best_other = sibling[:, None, :].masked_fill(~not_self, float("-inf")).max(-1).values  # [B, K]
        own_margin = margins(scores[:, 0], best_other[:, :1])  # [B, H]
        rival_margin = margins(current[:, :1, None],
                               torch.maximum(best_other[:, 1:, None], scores[:, 1:]))  # [B, K-1, H]
        candidate_margin = torch.cat([own_margin[:, None], rival_margin], dim=1).flatten(1)  # [B, K*H]
        key = candidate_margin.masked_fill(absent, torch.finfo(current.dtype).min).masked_fill(removed.flatten(1),
                                                                                               float("-inf"))
        best = key.argmax(1)
        slot, head = best // num_heads, best % num_heads
        removal_order[:, step] = best
        score_before[:, step] = current[batch, slot]
        new_score = scores[batch, slot, head]
        score_after[:, step] = new_score
        margin_after[:, step] = candidate_margin[batch, best]
        current[batch, slot] = torch.where(present[batch, slot], new_score, current[batch, slot])
        removed[batch, slot, head] = True

    removal_step = removal_order.argsort(1)
    num_present = present.sum(1) * num_heads
    return MaskingResult(
        classes=classes,
        prompts=prompts,
        removal_order=removal_order,
        margin_after=margin_after,
        score_before=score_before,
        score_after=score_after,
        removal_step=removal_step,
        is_trait=trait_heads(margin_after, removal_step, num_present, stopping, top_k),
        drop_alone=drop_alone,
        margin=margin,
        score=rival_scores[batch, own],
        runner_up=rival_scores.masked_fill(~others, float("-inf")).max(1).values,
        maps=maps,
    )
