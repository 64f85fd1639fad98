"""A slow, obviously-correct Prompt-CAM: the equations written out, one full sequence per block.

Every block is evaluated on the whole sequence [prompts, CLS, (registers), patches] with explicit attention
computed from the block's weights (`taxotrait.model.block_attention`), and an optional key mask. It is the oracle
of the tests and the baseline of the benchmarks; use `taxotrait.model.PromptCAM` for real work.
"""

from __future__ import annotations

import torch

from .model import PromptCAM, block_attention


def naive_forward(model: PromptCAM, images: torch.Tensor, blur: torch.Tensor | None = None, blur_mode: str = "uniform_patches"):
    """Scores [B, C] and last-block attention [B, C, heads, keys] of `model`, computed the slow way.

    blur: [B, C, heads] bool, heads of class prompts whose attention row is replaced by the uniform row.
    """
    vit = model.backbone
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    num_classes = model.num_classes
    for index, block in enumerate(vit.blocks[:-1]):
        offset = index - model.first_prompted_block
        if offset < 0:
            x, _ = block_attention(block, x)
            continue
        prompts = model.agnostic_prompts[offset]
        out, _ = block_attention(block, torch.cat([prompts.expand(x.shape[0], -1, -1), x], dim=1))
        x = out[:, prompts.shape[0] :]
    sequence = torch.cat([model.class_prompts.expand(x.shape[0], -1, -1), x], dim=1)
    length = sequence.shape[1]
    key_mask = None
    if not model.joint_class_attention:  # class prompts see only image tokens; image tokens do not see prompts
        key_mask = torch.ones(length, length, dtype=torch.bool, device=sequence.device)
        key_mask[:, :num_classes] = False
        key_mask[:num_classes, :num_classes] = False

    def override(weights):
        if blur is None:
            return weights
        weights = weights.clone()
        num_patches = vit.patch_embed.num_patches
        for b, c, h in blur.nonzero().tolist():
            row = torch.zeros(length, dtype=weights.dtype, device=weights.device)
            if blur_mode == "zero_logits":  # every key the row could see gets the same weight
                visible = torch.ones(length, dtype=torch.bool, device=weights.device) if key_mask is None else key_mask[c]
                row[visible] = 1.0 / int(visible.sum())
            else:
                row[-num_patches:] = 1.0 / num_patches
            weights[b, h, c] = row
        return weights

    out, weights = block_attention(vit.blocks[-1], sequence, key_mask, override)
    scores = model.head(vit.norm(out[:, :num_classes])).squeeze(-1)
    attention = weights[:, :, :num_classes].transpose(1, 2)
    if not model.joint_class_attention:
        attention = attention[..., num_classes:]
    return scores, attention


def naive_greedy_head_masking(model: PromptCAM, images: torch.Tensor, classes: torch.Tensor,
                              blur_mode: str = "uniform_patches"):
    """Greedy head masking the authors' way: one full naive forward per image, step and candidate head.

    Returns (removal_order [B, H], score_after [B, H]).
    """
    num_heads = model.num_heads
    orders, scores = [], []
    for image, label in zip(images, classes.tolist()):
        removed, order, after = [], [], []
        for _ in range(num_heads):
            candidates = [h for h in range(num_heads) if h not in removed]
            results = []
            for head in candidates:
                blur = torch.zeros(1, model.num_classes, num_heads, dtype=torch.bool, device=images.device)
                blur[0, label, removed + [head]] = True
                results.append(naive_forward(model, image[None], blur, blur_mode)[0][0, label])
            best = max(range(len(candidates)), key=lambda i: results[i])
            removed.append(candidates[best])
            order.append(candidates[best])
            after.append(results[best])
        orders.append(order)
        scores.append(torch.stack(after))
    return torch.tensor(orders), torch.stack(scores)
