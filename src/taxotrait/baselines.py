"""The baselines of Prompt-CAM's Table 1: a linear probe on the frozen backbone, explained by Grad-CAM, Layer-CAM and
Eigen-CAM (the `grad-cam` package, pytorch-grad-cam) and by attention rollout (Abnar & Zuidema, 2020).

The probe is the paper's protocol: one linear layer on the final-norm CLS token of the same frozen backbone. It is
trained on the cached frozen tokens (`LinearProbe.features`: the rest of the backbone run on them), and is a whole
differentiable model of images (`LinearProbe.forward`) for the faithfulness metrics.

CAMs are taken at the standard ViT layer, the last block's first norm (`blocks[-1].norm1`), whose patch tokens are
reshaped to the patch grid (pytorch-grad-cam's ViT reshape transform, after dropping the register tokens). Because
the backbone is frozen, the activations and gradients of that layer depend only on the tokens entering the first
prompted block, so the CAMs are computed from the cached tokens: exactly the maps of the full image model, at a
fraction of the cost (`cam_maps`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .backbone import tokens_entering, weights_digest
from .model import block_attention, class_rivals, rival_prediction

CAM_METHODS = ("grad_cam", "layer_cam", "eigen_cam")
PROBE_FORMAT = "taxotrait-linear-probe-1"


def block_first_token(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)[:, 0]` of a pre-norm timm ViT block, computing the attention and MLP at the first token only."""
    return block_attention(block, x, num_queries=1)[0][:, 0]


class LinearProbe(nn.Module):
    """A linear classifier on the final-norm CLS token of a frozen ViT.

    first_block: the block the cached tokens enter (`PromptCAM.first_prompted_block`; default the last block, i.e.
    prompt depth 1).
    """

    def __init__(self, backbone: VisionTransformer, class_names: list[str], first_block: int | None = None):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.class_names = list(class_names)
        self.first_block = len(backbone.blocks) - 1 if first_block is None else int(first_block)
        self.head = nn.Linear(backbone.embed_dim, len(self.class_names))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering block `first_block` (what the token caches hold), differentiable in the images."""
        return tokens_entering(self.backbone, images, self.first_block)

    @torch.no_grad()
    def frozen_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """`tokens` without gradients."""
        return self.tokens(images)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final-norm CLS token [B, D] from tokens entering block `first_block`."""
        blocks = self.backbone.blocks
        for block in blocks[self.first_block : -1]:
            tokens = block(tokens)
        return self.backbone.norm(block_first_token(blocks[-1], tokens))

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] of normalised images (differentiable: Grad-CAM can run on it directly)."""
        return self.forward_tokens(self.tokens(images))


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2),
    max_iter: int = 100,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression (full-batch L-BFGS from zeros, deterministic): (weight [C, D], bias [C], l2).

    With `groups` [C] (contrast 'siblings') the softmax of each image runs over its class's siblings only, the loss
    Prompt-CAM is trained with (`taxotrait.train.contrast_loss`; images of a class without siblings add none), and
    validation accuracy is the accuracy among the true class's siblings. The L2 penalty (on the weights) is chosen
    from `l2_grid` by validation accuracy, ties to the strongest; without a validation set the middle value is used.
    """
    from .train import contrast_loss

    features, labels = features.double(), labels.long()
    rivals = class_rivals(groups, labels, num_classes)
    counted = contrast_loss(torch.zeros(len(labels), num_classes), labels, rivals)[1]
    if not counted.any():
        raise ValueError("no training image has a class with a rival: nothing for a linear probe to tell apart")
    grid = list(l2_grid) if val_features is not None and len(val_features) else [sorted(l2_grid)[len(l2_grid) // 2]]
    best = None
    for l2 in sorted(grid, reverse=True):
        weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            optimizer.zero_grad()
            losses, _ = contrast_loss(features @ weight.T + bias, labels, rivals)
            loss = losses[counted].mean() + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        weight, bias = weight.detach(), bias.detach()
        if len(grid) == 1:
            return weight.float(), bias.float(), l2
        prediction = rival_prediction(val_features.double() @ weight.T + bias, val_labels, groups)
        accuracy = (prediction == val_labels).double().mean().item()
        if best is None or accuracy > best[0]:
            best = (accuracy, weight, bias, l2)
    return best[1].float(), best[2].float(), best[3]


def save_probe(probe: LinearProbe, path: str | os.PathLike, backbone_name: str, digest: str | None = None,
               **metadata) -> Path:
    """The probe's linear layer and metadata (rank, accuracy, ...); the backbone is identified by its weights' digest
    (computed unless given)."""
    from .checkpoint import atomic_save

    return atomic_save({
        "format": PROBE_FORMAT, "backbone": backbone_name, "backbone_digest": digest or weights_digest(probe.backbone),
        "class_names": probe.class_names, "first_block": probe.first_block,
        "state_dict": {k: v.detach().cpu() for k, v in probe.head.state_dict().items()}, "metadata": metadata,
    }, path)


def load_probe(path: str | os.PathLike, backbone: VisionTransformer, digest: str | None = None) -> tuple[LinearProbe, dict]:
    """(probe, metadata) of a file written by `save_probe`, on `backbone` (checked against its weights digest)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != PROBE_FORMAT:
        raise ValueError(f"{path} is not a linear probe of taxotrait (format {PROBE_FORMAT})")
    digest = digest or weights_digest(backbone)
    if payload["backbone_digest"] != digest:
        raise ValueError(f"{path} was trained on other backbone weights ({payload['backbone_digest'][:12]}...)")
    probe = LinearProbe(backbone, payload["class_names"], payload["first_block"])
    probe.head.load_state_dict(payload["state_dict"])
    return probe.eval(), payload["metadata"]


# --------------------------------------------------------------------------------------------------- CAMs
class _TokenModel(nn.Module):
    """The probe as a function of cached tokens, for pytorch-grad-cam."""

    def __init__(self, probe: LinearProbe):
        super().__init__()
        self.probe = probe

    def forward(self, tokens):
        return self.probe.forward_tokens(tokens)


def vit_reshape(num_prefix_tokens: int, grid: tuple[int, int]):
    """pytorch-grad-cam's ViT reshape transform ([B, T, D] -> [B, D, h, w]) for `num_prefix_tokens` CLS + registers."""
    from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

    def reshape(tensor):  # vit_reshape_transform drops one prefix token (the CLS): drop the registers first
        return vit_reshape_transform(tensor[:, num_prefix_tokens - 1 :], *grid)

    return reshape


class SiblingContrastTarget:
    """The CAM target of a class against its rivals: s[c] - logsumexp(s[j], j a rival of c other than c), the
    decision of the sibling softmax (its gradient is s[c]'s minus the rivals' gradients weighted by their softmax
    among themselves); s[c] alone when c has no other rival."""

    def __init__(self, category: int, rivals: torch.Tensor):
        self.category = int(category)
        self.others = rivals.clone()
        self.others[self.category] = False

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        score = output[..., self.category]
        if not self.others.any():
            return score
        return score - torch.logsumexp(output[..., self.others.to(output.device)], dim=-1)


def eigen_projection(activations: np.ndarray) -> np.ndarray:
    """Eigen-CAM with its sign fixed: activations [B, K, h, w] -> maps [B, h, w].

    Each image's activations (one row per position) are centred and projected on their first principal component
    (pytorch-grad-cam's Eigen-CAM); the component's sign, arbitrary in an SVD, is chosen so that the map correlates
    positively with the mean of the activations over channels at each position (the activations' mean)."""
    maps = []
    for image in np.nan_to_num(np.asarray(activations, dtype=np.float64)):
        rows = image.reshape(image.shape[0], -1).T  # [positions, channels]
        centred = rows - rows.mean(0)
        projection = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
        mean = rows.mean(1)
        if np.dot(projection, mean - mean.mean()) < 0:
            projection = -projection
        maps.append(projection.reshape(image.shape[1:]))
    return np.asarray(maps, dtype=np.float32)


def _cam_class(method: str, grid: tuple[int, int]):
    """The package's CAM class for `method`, returning maps on the patch grid (not resized to an input image);
    Eigen-CAM with its sign fixed (`eigen_projection`)."""
    from pytorch_grad_cam import EigenCAM, GradCAM, LayerCAM

    base = {"grad_cam": GradCAM, "layer_cam": LayerCAM, "eigen_cam": EigenCAM}[method]

    class OnGrid(base):
        def get_target_width_height(self, input_tensor):
            return grid[1], grid[0]

        if method == "eigen_cam":
            def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
                return eigen_projection(activations)

    return OnGrid


def cam_maps(method: str, probe: LinearProbe, tokens: torch.Tensor, targets: torch.Tensor | None = None,
             batch_size: int = 32, rivals: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM, Layer-CAM or Eigen-CAM of the probe for classes `targets` [B], from cached tokens [B, T, D].

    The target is the class score s[c] (contrast 'rank'), or with `rivals` (bool [B, C], `class_rivals`: contrast
    'siblings') the class against its siblings (`SiblingContrastTarget`). Maps [B, h, w] on the patch grid, as
    pytorch-grad-cam makes them: ReLU, then min-max normalised per image. Eigen-CAM is class-agnostic (first
    principal component of the layer's activations, sign fixed).
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
    vit = probe.backbone
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    cam = _cam_class(method, grid)(model=_TokenModel(probe), target_layers=[vit.blocks[-1].norm1],
                                   reshape_transform=vit_reshape(vit.num_prefix_tokens, grid))
    cam.compute_input_gradient = True  # the backbone is frozen: gradients reach the layer through the tokens
    if targets is None:
        chosen = None
    elif rivals is None:
        chosen = [ClassifierOutputTarget(int(t)) for t in targets]
    else:
        chosen = [SiblingContrastTarget(int(t), r) for t, r in zip(targets, rivals.cpu())]
    maps = []
    try:
        with torch.enable_grad():
            for start in range(0, len(tokens), batch_size):
                chunk = tokens[start : start + batch_size].float()
                maps.append(cam(input_tensor=chunk, targets=None if chosen is None else chosen[start : start + batch_size]))
    finally:
        cam.activations_and_grads.release()
    return np.concatenate(maps).astype(np.float32)


# ------------------------------------------------------------------------------------------------ rollout
@torch.no_grad()
def attention_rollout(backbone: VisionTransformer, images: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout of the CLS token over the patches, [B, h, w] (Abnar & Zuidema, 2020).

    Per block: the heads' attention averaged (head fusion "mean"), plus `residual` x identity for the skip
    connection (A' = (1 - r) A + r I, r = 0.5), rows renormalised; the rollout is the product A'_L ... A'_1 and the
    map its CLS row over the patch tokens. Attention is computed explicitly from the block weights
    (`taxotrait.model.block_attention`), so timm's fused attention needs no switching off.
    """
    vit = backbone
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    length = x.shape[1]
    eye = torch.eye(length, device=x.device, dtype=x.dtype)
    rollout = eye.expand(x.shape[0], -1, -1)
    for block in vit.blocks:
        x, weights = block_attention(block, x)
        fused = (1 - residual) * weights.mean(1) + residual * eye
        rollout = (fused / fused.sum(-1, keepdim=True)) @ rollout
    h, w = vit.patch_embed.grid_size
    return rollout[:, 0, vit.num_prefix_tokens :].unflatten(-1, (h, w))
