"""Prompt-CAM on a frozen timm ViT.

Score of class c: s[c] = w^T LN(z_c) + b, with z_c the last block's output at class prompt c, LN the backbone's own
final norm, and w, b shared by all classes. Two variants share one code path:

- ``reference``: the authors' released model. Every block gets C prompts prepended ([prompts, CLS, (registers),
  patches]); the prompts of blocks 0..N-2 are class-agnostic and dropped after their block, those of the last block
  are the class prompts, which attend jointly to each other and to the image tokens.
- ``scalable`` with prompt depth k: a configurable number of class-agnostic prompts in blocks N-k..N-2 and the class
  prompts only in the last block, where each attends to the image tokens alone. Classes are then independent, so they
  can be processed in chunks, and the tokens entering block N-k can be cached (`frozen_tokens`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .backbone import data_normalisation, tokens_entering, weights_digest

VARIANTS = ("reference", "scalable")
BLUR_MODES = ("uniform_patches", "zero_logits")
CONTRASTS = ("siblings", "rank")


def sibling_groups(parents: list[str]) -> torch.Tensor:
    """Group index [C] of each class: classes with the same parent share one (the siblings of a taxonomy)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(parent, len(index)) for parent in parents], dtype=torch.long)


def class_rivals(groups: torch.Tensor | None, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """bool [B, C]: the classes each class of `labels` [B] competes with, itself included: those of its group
    (`sibling_groups`: contrast 'siblings'), or every class without groups (contrast 'rank')."""
    if groups is None:
        return torch.ones(len(labels), num_classes, dtype=torch.bool, device=labels.device)
    groups = groups.to(labels.device)
    return groups[None, :] == groups[labels][:, None]


def families(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(groups, members, start, size) of sibling groups [C] (`sibling_groups`): the families (classes of one group),
    their classes in class order one family after another, each family's first position among them and its size."""
    sizes = torch.bincount(groups)
    return groups, groups.argsort(stable=True), sizes.cumsum(0) - sizes, sizes


def family_columns(classes: torch.Tensor, groups: torch.Tensor, members: torch.Tensor, start: torch.Tensor,
                   size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns, rivals) of images of classes `classes` [B] from `families` (on their device): see
    `PromptCAM.rival_columns`."""
    num_classes = len(groups)
    family = groups[classes]
    width = int(size[family].max()) if len(classes) else num_classes
    if width == num_classes:
        return torch.arange(num_classes, device=classes.device), class_rivals(groups, classes, num_classes)
    return family_members(family, members, start, size, classes)


def family_members(family: torch.Tensor, members: torch.Tensor, start: torch.Tensor, size: torch.Tensor,
                   padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns [B, W], present bool [B, W]): the classes of the families `family` [B] (`families`' members, start
    and size), W the largest of them, a shorter row padded with `padding` [B] (present False there)."""
    width = int(size[family].max()) if len(family) else 0
    offsets = torch.arange(width, device=family.device)
    present = offsets < size[family][:, None]
    index = (start[family][:, None] + offsets).clamp(max=len(members) - 1)
    return torch.where(present, members[index], padding[:, None]), present


def rival_prediction(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """The best class [B] among the rivals (`class_rivals`) of each true class `labels` [B]: the prediction given the
    true parent under contrast 'siblings', the flat prediction without groups."""
    rivals = class_rivals(groups, labels.to(scores.device), scores.shape[1])
    return scores.masked_fill(~rivals, float("-inf")).argmax(1)


# ------------------------------------------------------------------- one pre-norm timm ViT block, step by step
def split_heads(block: Block, x: torch.Tensor) -> torch.Tensor:
    """[B, L, H*d] -> [B, H, L, d] for the heads of `block`."""
    return x.unflatten(-1, (block.attn.num_heads, block.attn.head_dim)).transpose(1, 2)


def qkv_parameters(block: Block):
    """((w_q, b_q), (w_kv, b_kv)) of the block's qkv projection (biases may be None)."""
    attn = block.attn
    w_q, w_kv = attn.qkv.weight.split([attn.attn_dim, 2 * attn.attn_dim])
    b_q, b_kv = attn.qkv.bias.split([attn.attn_dim, 2 * attn.attn_dim]) if attn.qkv.bias is not None else (None, None)
    return (w_q, b_q), (w_kv, b_kv)


def block_queries(block: Block, normed: torch.Tensor) -> torch.Tensor:
    """Per-head queries [B, H, L, d] of tokens [B, L, D] after the block's first norm (`block.norm1`)."""
    w_q, b_q = qkv_parameters(block)[0]
    return block.attn.q_norm(split_heads(block, F.linear(normed, w_q, b_q)))


def block_keys_values(block: Block, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys and values ([B, H, L, d] each) of tokens [B, L, D] after the block's first norm."""
    w_kv, b_kv = qkv_parameters(block)[1]
    k, v = F.linear(normed, w_kv, b_kv).chunk(2, dim=-1)
    return block.attn.k_norm(split_heads(block, k)), split_heads(block, v)


def attention_weights(block: Block, q: torch.Tensor, k: torch.Tensor,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention [B, H, queries, keys], computed explicitly; key_mask: bool [queries, keys], True where a
    query may attend to a key."""
    logits = (q * block.attn.scale) @ k.transpose(-2, -1)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    return logits.softmax(dim=-1)


def block_output(block: Block, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """The block's output at query tokens x [B|1, L, D] from their attention outputs per head `mixed` [B, H, L, d]:
    projection, layer-scaled residual, then the MLP's."""
    attn = block.attn
    z = x + block.ls1(attn.proj(attn.norm(mixed.transpose(1, 2).flatten(-2))))
    return z + block.ls2(block.mlp(block.norm2(z)))


def block_attention(block: Block, x: torch.Tensor, key_mask: torch.Tensor | None = None, row_override=None,
                    num_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm timm ViT block on tokens x [B, L, D] with explicit attention: (output tokens, attention).

    Only the first `num_queries` tokens (all by default) are queries: the output is [B, num_queries, D], the
    attention [B, H, num_queries, L]. key_mask: see `attention_weights`. row_override(attention) may replace
    attention rows before they mix the values.
    """
    normed = block.norm1(x)  # once for the whole sequence, as in `block(x)` (a CAM hooks this layer)
    queries = slice(None, num_queries)
    k, v = block_keys_values(block, normed)
    weights = attention_weights(block, block_queries(block, normed[:, queries]), k, key_mask)
    if row_override is not None:
        weights = row_override(weights)
    return block_output(block, x[:, queries], weights @ v), weights


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are placed: the variant, prompt depth k and number of class-agnostic prompts."""

    variant: str = "scalable"
    prompt_depth: int = 1
    num_prompts: int = 8

    def resolved(self, num_blocks: int, num_classes: int) -> "PromptConfig":
        """The configuration with the reference variant's fixed values filled in, validated."""
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "reference":
            return PromptConfig("reference", num_blocks, num_classes)
        if not 1 <= self.prompt_depth <= num_blocks:
            raise ValueError(f"model.prompt_depth must be in 1..{num_blocks} for this backbone, got {self.prompt_depth}")
        if self.num_prompts < 1 and self.prompt_depth > 1:
            raise ValueError(f"model.num_prompts must be >= 1 when prompt_depth > 1, got {self.num_prompts}")
        return self


class PromptCAM(nn.Module):
    """Class prompts and a shared linear score on a frozen ViT; see the module docstring."""

    def __init__(
        self,
        backbone: VisionTransformer,
        class_names: list[str],
        prompts: PromptConfig = PromptConfig(),
        normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        backbone_name: str | None = None,
        class_parents: list[str] | None = None,
    ):
        super().__init__()
        if not all(type(block) is Block for block in backbone.blocks):
            raise TypeError("PromptCAM needs a timm VisionTransformer made of standard pre-norm `Block`s")
        self.backbone = backbone.requires_grad_(False).eval()
        self.class_names = list(class_names)
        if class_parents is not None and len(class_parents) != len(self.class_names):
            raise ValueError(f"{len(class_parents)} class parents given for {len(self.class_names)} classes")
        self.class_parents = None if class_parents is None else [str(p) for p in class_parents]
        # contrast 'siblings': a class competes only with the classes of its parent; 'rank': with every class
        family = families(sibling_groups(self.class_parents or [""] * len(self.class_names)))
        for name, tensor in zip(("groups", "family_members", "family_start", "family_size"), family):
            self.register_buffer(name, tensor, persistent=False)
        num_blocks, dim = len(backbone.blocks), backbone.embed_dim
        self.prompt_config = prompts.resolved(num_blocks, len(self.class_names))
        pretrained_cfg = getattr(backbone, "pretrained_cfg", {})
        self.backbone_name = backbone_name or pretrained_cfg.get("architecture", type(backbone).__name__)
        mean, std = normalisation or data_normalisation(backbone)
        self.normalisation = (tuple(mean), tuple(std))

        # The authors' initialisation (VPT): uniform(+-sqrt(6 / (3 * patch_area + D))).
        patch_area = math.prod(backbone.patch_embed.patch_size)
        bound = math.sqrt(6.0 / (3 * patch_area + dim))
        n_agnostic_blocks = self.prompt_config.prompt_depth - 1
        self.agnostic_prompts = nn.Parameter(
            torch.empty(n_agnostic_blocks, self.prompt_config.num_prompts if n_agnostic_blocks else 0, dim).uniform_(-bound, bound)
        )
        self.class_prompts = nn.Parameter(torch.empty(len(self.class_names), dim).uniform_(-bound, bound))
        self.head = nn.Linear(dim, 1)
        self._backbone_digest: str | None = None

    # ----------------------------------------------------------------- structure
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def contrast(self) -> str:
        """'siblings' when each class competes only with its siblings (class_parents given), else 'rank'."""
        return "rank" if self.class_parents is None else "siblings"

    def rivals(self, classes: torch.Tensor) -> torch.Tensor:
        """bool [B, C]: the classes each class of `classes` [B] competes with, itself included (its siblings under
        contrast 'siblings', every class under 'rank')."""
        return class_rivals(self.groups, classes, self.num_classes)

    def rival_columns(self, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns, rivals): the classes to score for images of classes `classes` [B], and which are rivals.

        Under contrast 'siblings', columns [B, R] holds each image's family (its parent's children, in class order;
        R the largest family in the batch, a shorter row padded with the image's own class), so that scoring them
        costs O(B x siblings) rather than O(B x C). When one family holds every class (contrast 'rank'), columns [C]
        is every class. rivals: bool [B, R] (or [B, C]), False at the padding. Scores of the columns restricted to
        the rivals are the full scores restricted to `rivals(classes)`, in another order.
        """
        family = (self.groups, self.family_members, self.family_start, self.family_size)
        return family_columns(classes, *(tensor.to(classes.device) for tensor in family))

    @staticmethod
    def own_columns(columns: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`rival_columns`' columns as [B, R] and the position [B] of each image's own class among them (its first
        column: the padding comes later)."""
        columns = columns.expand(len(classes), -1)
        return columns, (columns == classes[:, None]).int().argmax(1)

    @staticmethod
    def best_rival(scores: torch.Tensor, columns: torch.Tensor, rivals: torch.Tensor) -> torch.Tensor:
        """The class [B] of each image's best rival, from the scores [B, R] of `rival_columns`' columns and rivals."""
        best = scores.masked_fill(~rivals, float("-inf")).argmax(1, keepdim=True)
        return columns.expand(len(scores), -1).gather(1, best).squeeze(1)

    @property
    def has_rival(self) -> torch.Tensor:
        """bool [C]: whether each class competes with another (False for a monotypic taxon under 'siblings')."""
        return self.family_size[self.groups] > 1

    def sibling_prediction(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The best class [B] among the rivals of each true class `labels` (given the true parent)."""
        return rival_prediction(scores, labels, self.groups)

    @property
    def num_heads(self) -> int:
        return self.backbone.blocks[-1].attn.num_heads

    @property
    def first_prompted_block(self) -> int:
        """Index N-k of the first block that sees a trainable parameter."""
        return len(self.backbone.blocks) - self.prompt_config.prompt_depth

    @property
    def joint_class_attention(self) -> bool:
        """Whether class prompts attend to each other (the reference variant) or to the image tokens only."""
        return self.prompt_config.variant == "reference"

    def grid_size(self, num_tokens: int) -> tuple[int, int]:
        """Patch grid (h, w) of a token sequence of `num_tokens` image tokens (prefix tokens included)."""
        h, w = self.backbone.patch_embed.grid_size
        if num_tokens - self.backbone.num_prefix_tokens != h * w:
            raise ValueError(f"{num_tokens} image tokens do not match the {h}x{w} patch grid of the backbone")
        return h, w

    @property
    def backbone_digest(self) -> str:
        """SHA-256 of the frozen backbone's weights (computed once)."""
        if self._backbone_digest is None:
            self._backbone_digest = weights_digest(self.backbone)
        return self._backbone_digest

    def train(self, mode: bool = True):
        """Train mode for the prompts; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def config(self) -> dict:
        """Plain metadata describing the model (saved in checkpoints)."""
        return {
            "backbone": self.backbone_name,
            "img_size": int(self.backbone.patch_embed.img_size[0]),
            "class_names": self.class_names,
            "normalisation": [list(self.normalisation[0]), list(self.normalisation[1])],
            "class_parents": self.class_parents,
            **asdict(self.prompt_config),
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters only (prompts, w, b): what a checkpoint stores."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if not name.startswith("backbone.")}

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def frozen_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering block N-k, [B, T, D]: they depend on no trainable parameter and can be cached."""
        return tokens_entering(self.backbone, images, self.first_prompted_block)

    def last_block_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """From frozen tokens to the image tokens entering the last block, through the class-agnostic prompts."""
        blocks = self.backbone.blocks[self.first_prompted_block : -1]
        for block, prompts in zip(blocks, self.agnostic_prompts):
            n = prompts.shape[0]
            x = torch.cat([prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
            tokens = block(x)[:, n:]
        return tokens

    def forward(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        """Class scores [B, C] (or [B, K] for `classes`) of normalised images [B, 3, H, W]."""
        return self.forward_tokens(self.frozen_tokens(images), **kwargs)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        classes: torch.Tensor | None = None,
        blur: torch.Tensor | None = None,
        blur_mode: str = "uniform_patches",
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Class scores from frozen tokens (`frozen_tokens`), for all classes or the given ones.

        classes: [K] class indices shared by all images or [B, K] per image. blur: [B, K, heads] bool, heads whose
        attention row is made uniform (see `class_scores`). chunk_size: classes per chunk (scalable variant).
        """
        return self.class_scores(self.last_block_input(tokens), classes, blur, blur_mode, chunk_size)[0]

    def class_scores(
        self,
        image_tokens: torch.Tensor | None,
        classes: torch.Tensor | None = None,
        blur: torch.Tensor | None = None,
        blur_mode: str = "uniform_patches",
        chunk_size: int | None = None,
        return_attention: bool = False,
        keys_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores [B, K] of class prompts on the image tokens entering the last block, and their attention rows.

        Blurring a head replaces its attention row by uniform weights over the patch tokens (``uniform_patches``, the
        paper) or zeroes its pre-softmax logits, i.e. uniform over every key (``zero_logits``, the authors' code).
        The attention returned is [B, K, heads, keys], keys = [class prompts (reference variant), CLS, registers,
        patches]. `keys_values` (`image_keys_values`) may replace `image_tokens`.
        """
        if keys_values is None:
            keys_values = self.image_keys_values(image_tokens)
        if classes is None:
            classes = torch.arange(self.num_classes, device=keys_values.device)
        if blur_mode not in BLUR_MODES:
            raise ValueError(f"blur_mode must be one of {BLUR_MODES}, got {blur_mode!r}")
        n_classes = classes.shape[-1]
        chunk_size = chunk_size or n_classes
        scores, attention = [], []
        for start in range(0, n_classes, chunk_size):
            chunk = classes[..., start : start + chunk_size]
            chunk_blur = None if blur is None else blur[:, start : start + chunk_size]
            s, a = self._class_block(keys_values, chunk, chunk_blur, blur_mode, return_attention)
            scores.append(s)
            attention.append(a)
        return torch.cat(scores, dim=1), (torch.cat(attention, dim=1) if return_attention else None)

    def class_attention(self, images: torch.Tensor, classes: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Last-block attention of class prompts over the patch grid, [B, K, heads, h, w].

        classes: [K] or [B, K]. With raw=True, the whole rows [B, K, heads, keys] including prompts, CLS and registers.
        """
        image_tokens = self.last_block_input(self.frozen_tokens(images))
        _, attention = self.class_scores(image_tokens, classes, return_attention=True)
        if raw:
            return attention
        h, w = self.grid_size(image_tokens.shape[1])
        return attention[..., -h * w :].unflatten(-1, (h, w))

    # ---------------------------------------------------------- the last block
    def image_keys_values(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Keys and values of the image tokens in the last block, [B, 2, heads, T, d].

        With prompt depth 1 they depend on no trainable parameter: training computes them once per image view.
        """
        block = self.backbone.blocks[-1]
        return torch.stack(block_keys_values(block, block.norm1(image_tokens)), dim=1)

    def forward_keys_values(self, keys_values: torch.Tensor, classes: torch.Tensor | None = None,
                            chunk_size: int | None = None) -> torch.Tensor:
        """Class scores from precomputed `image_keys_values`."""
        return self.class_scores(None, classes, chunk_size=chunk_size, keys_values=keys_values)[0]

    def _class_block(self, keys_values, classes, blur, blur_mode, return_attention):
        """The last block evaluated at class prompts only: queries are the prompts, keys the image tokens."""
        queries = self.class_prompts[classes].to(keys_values.dtype)  # [K, D] or [B, K, D]
        if queries.dim() == 2:
            queries = queries.unsqueeze(0)
        q, k, v = self.class_queries_keys_values(keys_values, queries)
        q = q.expand(k.shape[0], -1, -1, -1)
        if blur is None and not return_attention:
            mixed = F.scaled_dot_product_attention(q, k, v)
            attention = None
        else:
            attention = attention_weights(self.backbone.blocks[-1], q, k)
            if blur is not None:
                attention = self.blur_attention(attention, blur, blur_mode)
            mixed = attention @ v
        scores = self.scores_from_head_outputs(queries, mixed)
        return scores, (attention.transpose(1, 2) if return_attention else None)

    def class_queries_keys_values(self, keys_values: torch.Tensor, queries: torch.Tensor):
        """Per-head q [B|1, H, K, d] of the prompt tokens `queries`, and the keys and values [B, H, keys, d] they see:
        the image tokens' (`keys_values`), preceded by every class prompt's in the reference variant."""
        block = self.backbone.blocks[-1]
        q = block_queries(block, block.norm1(queries))
        k, v = keys_values.unbind(1)
        if self.joint_class_attention:  # every class prompt is also a key/value (reference variant)
            pk, pv = block_keys_values(block, block.norm1(self.class_prompts.to(keys_values.dtype)[None]))
            batch = keys_values.shape[0]
            k = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2)
        return q, k, v

    def blur_attention(self, attention: torch.Tensor, blur: torch.Tensor, blur_mode: str) -> torch.Tensor:
        """Replace the rows [B, H, K, keys] of blurred heads (blur [B, K, H] bool) by `uniform_row`."""
        return torch.where(blur.transpose(1, 2).unsqueeze(-1), self.uniform_row(attention, blur_mode), attention)

    def uniform_row(self, attention: torch.Tensor, blur_mode: str) -> torch.Tensor:
        """The attention row of a blurred head: 1/M over the M patch tokens, or 1/keys over every key."""
        num_keys = attention.shape[-1]
        if blur_mode == "zero_logits":
            return attention.new_full((num_keys,), 1.0 / num_keys)
        num_patches = self.backbone.patch_embed.num_patches
        row = attention.new_zeros(num_keys)
        row[-num_patches:] = 1.0 / num_patches
        return row

    def scores_from_head_outputs(self, queries: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """Finish the last block at the prompts and score them: s = w^T LN(z) + b.

        queries: prompt tokens [B|1, K, D]; mixed: attention outputs per head [B, H, K, d] -> scores [B, K].
        """
        return self.head(self.backbone.norm(block_output(self.backbone.blocks[-1], queries, mixed))).squeeze(-1)
