"""The baselines of Prompt-CAM's Table 1: a linear probe on the frozen backbone, explained by Grad-CAM, Layer-CAM and
Eigen-CAM (the `grad-cam` package, pytorch-grad-cam) and by attention rollout (Abnar & Zuidema, 2020); and Finer-CAM
(Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual Explanation", CVPR 2025), Grad-CAM
of the class against its most similar classes (`FinerTarget`).

The probe is the paper's protocol: one linear layer on the final-norm CLS token of the same frozen backbone. It is
trained on the cached frozen tokens (`LinearProbe.features`: the rest of the backbone run on them, once, into a file:
`probe_feature_file`; then minibatches of those features: `fit_linear_probe`), and is a whole differentiable model of
images (`LinearProbe.forward`) for the faithfulness metrics.

CAMs are taken at the standard ViT layer, the last block's first norm (`blocks[-1].norm1`), whose patch tokens are
reshaped to the patch grid (pytorch-grad-cam's ViT reshape transform, after dropping the register tokens). Because
the backbone is frozen, the activations and gradients of that layer depend only on the tokens entering the first
prompted block, so the CAMs are computed from the cached tokens: exactly the maps of the full image model, at a
fraction of the cost (`cam_maps`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm.auto import tqdm

from .backbone import tokens_entering, weights_digest
from .data import ImageDataset
from .devices import mixed_precision
from .model import PromptCAM, block_attention, class_rivals, families, family_columns

if TYPE_CHECKING:
    from .token_cache import TokenDataset

CAM_METHODS = ("grad_cam", "layer_cam", "finer_cam", "eigen_cam")
# Finer-CAM's defaults in pytorch-grad-cam (`FinerCAM.forward`): the comparison classes' whole score subtracted
# (alpha 1), the three classes whose scores are nearest the target's compared with
FINER_ALPHA = 1.0
FINER_COMPARISONS = 3
PROBE_FORMAT = "taxotrait-linear-probe-1"
# the probe's minibatch training (`fit_linear_probe`): shuffled passes over the training features, at least so many
# steps on a small set, and Adam's learning rate on the standardised features. Every step updates every class's
# weights (exact Adam with an L2 penalty), so a large set takes larger batches, up to PROBE_MAX_BATCH, rather than
# more steps: the work grows with images + steps x classes, not images x classes (bench/RESULTS.md, taxonomy scale)
PROBE_EPOCHS = 10
PROBE_MIN_STEPS = 500
PROBE_MAX_BATCH = 1024
PROBE_LR = 0.03


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


def probe_feature_file(probe: LinearProbe, data, path: str | os.PathLike, batch_size: int,
                       device: torch.device, progress: bool = True) -> np.ndarray:
    """The final-norm CLS features [n, V, D] float32 of every view of the images of `data` (a `TokenDataset` with
    `every_view`, or an `ImageDataset`: one view, the frozen forward run here), computed `batch_size` images at a
    time into a .npy file at `path`, returned memory-mapped."""
    images = isinstance(data, ImageDataset)
    views, dim = 1 if images else data.cache.views, probe.backbone.embed_dim
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(data), views, dim))
    for start in tqdm(range(0, len(data), batch_size), desc=f"probe features {Path(path).stem}", disable=not progress):
        x = data.__getitems__(range(start, min(start + batch_size, len(data))))[0].to(device)
        with torch.no_grad(), mixed_precision(device):
            features = probe.features(probe.tokens(x) if images else x.flatten(0, 1)).float()
        array[start : start + len(x)] = features.unflatten(0, (len(x), views)).cpu().numpy()
    array.flush()
    del array
    return np.load(path, mmap_mode="r")


def _feature_batches(features, rows: torch.Tensor, batch_size: int, device: torch.device):
    """(rows, features [b, D] float32) of `rows` of an array-like [n, D] (a memory map or a tensor), `batch_size` rows
    at a time, each batch's rows read in increasing order."""
    for batch in rows.split(batch_size):
        batch = batch.sort().values
        yield batch, torch.as_tensor(np.asarray(features[batch.numpy()]), dtype=torch.float32).to(device)


def _rival_scores(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, family: tuple):
    """Scores of the rivals of the images' classes by heads `weight` [L, C, D], `bias` [L, C] of features `x` [B, D]
    with labels `y` [B] (`family`: `taxotrait.model.families`): (scores [L, B, R], own position [B], rivals bool
    [B, R]). Only the columns of the batch's families are scored (`family_columns`: each image's siblings under
    contrast 'siblings'), each once; every class when one family holds them all."""
    columns, rivals = family_columns(y, *family)
    if columns.dim() == 1:
        return torch.einsum("bd,lcd->lbc", x, weight) + bias[:, None], y, rivals
    columns, position = PromptCAM.own_columns(columns, y)
    used, where = columns.unique(return_inverse=True)
    scores = torch.einsum("bd,lud->lbu", x, weight.index_select(1, used)) + bias.index_select(1, used)[:, None]
    return scores.gather(2, where.expand(len(weight), -1, -1)), position, rivals


def rival_accuracy(features, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   groups: torch.Tensor | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Top-1 [L] among the true class's rivals (`taxotrait.model.rival_prediction`: the siblings under `groups`, every
    class without) of heads `weight` [L, C, D], `bias` [L, C] on features [n, D] (read `batch_size` rows at a time)."""
    device, num_classes = weight.device, weight.shape[1]
    family = _families(groups, num_classes, device)
    correct = torch.zeros(len(weight), dtype=torch.float64)
    for rows, x in _feature_batches(features, torch.arange(len(labels)), batch_size, device):
        scores, position, rivals = _rival_scores(x, labels[rows].to(device), weight, bias, family)
        correct += (scores.masked_fill(~rivals, float("-inf")).argmax(-1) == position).sum(1).cpu()
    return correct / max(len(labels), 1)


def _families(groups: torch.Tensor | None, num_classes: int, device: torch.device) -> tuple:
    """`families` of the sibling groups (contrast 'siblings'), or of one group of every class (contrast 'rank')."""
    groups = torch.zeros(num_classes, dtype=torch.long) if groups is None else groups.long()
    return tuple(tensor.to(device) for tensor in families(groups))


def fit_linear_probe(
    features,
    labels: torch.Tensor,
    num_classes: int,
    val_features=None,
    val_labels: torch.Tensor | None = None,
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2),
    groups: torch.Tensor | None = None,
    batch_size: int = 128,
    epochs: int = PROBE_EPOCHS,
    min_steps: int = PROBE_MIN_STEPS,
    lr: float = PROBE_LR,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression by minibatches: (weight [C, D], bias [C], l2).

    features [n, D]: a memory map or tensor, read `batch_size` rows at a time (its mean and spread once, then
    `epochs` shuffled passes, more for a small set: `min_steps` steps at least; a large set in larger batches, up to
    PROBE_MAX_BATCH, so that the steps stay near `min_steps`), so memory does not grow with n.
    Minimises the mean cross-entropy plus l2 * |weight|^2 with Adam (`lr`, cosine decay, from zeros; the features
    standardised inside, which leaves the minimum unchanged), for every L2 penalty of `l2_grid` at once, seeded by
    `seed`. With `groups` [C] (contrast 'siblings') the softmax of each image runs over its class's siblings only and
    only their columns are scored (`taxotrait.model.family_columns`), the loss Prompt-CAM is trained with
    (`taxotrait.train.contrast_loss`; images of a class without siblings add none), and validation accuracy is the
    accuracy among the true class's siblings. The penalty is chosen by validation accuracy (`rival_accuracy`), ties
    to the strongest; without a validation set the middle value is used.
    """
    from .train import contrast_loss

    device, labels = torch.device(device), torch.as_tensor(labels).long()
    family = _families(groups, num_classes, device)
    if not (family[3][family[0][labels.to(device)]] > 1).any():
        raise ValueError("no training image has a class with a rival: nothing for a linear probe to tell apart")
    validated = val_features is not None and len(val_features) > 0
    grid = sorted(l2_grid, reverse=True) if validated else [sorted(l2_grid)[len(l2_grid) // 2]]
    mean, spread = _feature_statistics(features, batch_size, device)
    dim, penalties, inverse_variance = len(mean), torch.tensor(grid, device=device), spread.pow(-2)
    weight = torch.zeros(len(grid), num_classes, dim, device=device, requires_grad=True)  # on standardised features
    bias = torch.zeros(len(grid), num_classes, device=device, requires_grad=True)
    batch_size = max(batch_size, min(PROBE_MAX_BATCH, -(-epochs * len(labels) // min_steps)))
    steps_per_epoch = -(-len(labels) // batch_size)
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    optimizer = torch.optim.Adam([weight, bias], lr=lr, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress):
        order = torch.randperm(len(labels), generator=generator)
        for rows, x in _feature_batches(features, order, batch_size, device):
            y = labels[rows].to(device)
            with torch.enable_grad():
                scores, position, rivals = _rival_scores((x - mean) / spread, y, weight, bias, family)
                losses, counted = contrast_loss(scores.flatten(0, 1), position.repeat(len(grid)),
                                                rivals.repeat(len(grid), 1))
                counted = counted[: len(y)]
                if not counted.any():
                    continue
                penalty = (penalties * (weight.pow(2) * inverse_variance).sum((1, 2))).sum()
                loss = losses.view(len(grid), -1)[:, counted].mean(1).sum() + penalty
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            schedule.step()
    weight = (weight / spread).detach()  # back to the features as they are
    bias = bias.detach() - weight @ mean
    best = 0
    if len(grid) > 1:
        best = int(rival_accuracy(val_features, torch.as_tensor(val_labels), weight, bias, groups, batch_size).argmax())
    return weight[best].cpu(), bias[best].cpu(), grid[best]


def _feature_statistics(features, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and standard deviation [D] (1 where a feature is constant) of features [n, D], `batch_size` rows at a
    time."""
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    for _, x in _feature_batches(features, torch.arange(len(features)), batch_size, device):
        total += x.sum(0).double()
        squares += x.double().pow(2).sum(0)
    mean = total / len(features)
    spread = (squares / len(features) - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), torch.where(spread > 1e-6 * (1 + mean.abs()), spread, torch.ones_like(spread)).float()


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


def nearest_rivals(scores: torch.Tensor, category: int, rivals: torch.Tensor,
                   count: int = FINER_COMPARISONS) -> list[int]:
    """Finer-CAM's comparison classes: the `count` rivals (bool [C]) of `category` other than itself whose scores [C]
    are nearest its own, nearest first."""
    others = rivals.clone()
    others[category] = False
    distance = (scores - scores[category]).abs().masked_fill(~others, float("inf"))
    return distance.argsort(stable=True)[: min(count, int(others.sum()))].tolist()


class FinerTarget:
    """Finer-CAM's target of a class among its rivals (bool [C]): s[c] - alpha sum_d q[d] s[d] over the rivals d
    nearest in score (`nearest_rivals`, on the scores of the pass being explained), q their softmax among themselves;
    s[c] alone when c has no other rival.

    This is pytorch-grad-cam's `FinerWeightedTarget` without its epsilon: that target divides by the comparison
    classes' probability among every class plus 1e-9, and once that probability falls below 1e-9 (a sure class,
    margin over about 20) the gradient of the epsilon outweighs the rest and points at the comparison classes."""

    def __init__(self, category: int, rivals: torch.Tensor):
        self.category, self.rivals = int(category), rivals

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        nearest = nearest_rivals(output.detach(), self.category, self.rivals.to(output.device))
        score = output[..., self.category]
        if not nearest:
            return score
        compared = output[..., nearest]
        return score - FINER_ALPHA * (compared.softmax(-1) * compared).sum(-1)


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
    Finer-CAM is GradCAM (the base method of the package's FinerCAM) of its own targets; Eigen-CAM with its sign
    fixed (`eigen_projection`)."""
    from pytorch_grad_cam import EigenCAM, GradCAM, LayerCAM

    base = {"grad_cam": GradCAM, "layer_cam": LayerCAM, "finer_cam": GradCAM, "eigen_cam": EigenCAM}[method]

    class OnGrid(base):
        def get_target_width_height(self, input_tensor):
            return grid[1], grid[0]

        if method == "eigen_cam":
            def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
                return eigen_projection(activations)

    return OnGrid


def cam_maps(method: str, probe: LinearProbe, tokens: torch.Tensor, targets: torch.Tensor | None = None,
             batch_size: int = 32, rivals: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM, Layer-CAM, Finer-CAM or Eigen-CAM of the probe for classes `targets` [B], from cached tokens [B, T, D].

    The target is the class score s[c] (contrast 'rank'), or with `rivals` (bool [B, C], `class_rivals`: contrast
    'siblings') the class against its siblings (`SiblingContrastTarget`); Finer-CAM's is the class against its
    rivals nearest in score (`FinerTarget`), every class being a rival without `rivals`. Maps [B, h, w] on the patch
    grid, as pytorch-grad-cam makes them: ReLU, then min-max normalised per image. Eigen-CAM is class-agnostic (first
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
    elif method == "finer_cam":
        rivals = class_rivals(None, targets, len(probe.class_names)) if rivals is None else rivals
        chosen = [FinerTarget(t, r) for t, r in zip(targets.tolist(), rivals.cpu())]
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
