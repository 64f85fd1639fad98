"""Faithfulness of saliency maps: insertion and deletion (Petsiuk et al., RISE, BMVC 2018).

Target: a class (the model's predicted class in the workflow); score: its softmax probability. Pixels are ranked
by the saliency map, upsampled (bilinear) to the input size, most salient first; ties are broken by pixel index
(a stable sort of -saliency in row-major order), so the ranking is the same on every run and device.

- deletion: starting from the image, the ranked pixels are set to zero in normalised space, i.e. to the dataset's
  mean colour, `pixels_per_step` at a time; a faithful map makes the probability fall fast (lower AUC is better);
- insertion: starting from a Gaussian-blurred copy of the image (kernel 11, sigma 5), the ranked pixels are
  restored; a faithful map makes the probability rise fast (higher AUC is better).

A "pixel" is a spatial position (all three channels). Each curve has one point per step, from 0 to every pixel
changed; its area is the trapezoid rule over the fraction of pixels changed, [0, 1]. Every perturbed image of every
step and image is scored in batches of `batch_size`, so a GPU runs at full speed. The curves' ends (the image, every
pixel deleted, every pixel blurred) do not depend on the map: `endpoint_probabilities` scores them once for all the
maps of one model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLUR_KERNEL, BLUR_SIGMA = 11, 5.0


def upsample(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps [B, h, w] -> [B, H, W], bilinear (half-pixel centres, as the attention maps' patches)."""
    if tuple(saliency.shape[-2:]) == tuple(size):
        return saliency.float()
    return F.interpolate(saliency[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def pixel_order(saliency: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> [B, H*W]: the pixels' (row-major) indices, most salient first; ties in index order."""
    return torch.sort(-saliency.flatten(1).float(), dim=1, stable=True).indices


def pixel_rank(saliency: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> [B, H*W]: the position of each pixel in `pixel_order` (0 = most salient)."""
    order = pixel_order(saliency)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def step_counts(num_pixels: int, pixels_per_step: int) -> torch.Tensor:
    """Pixels changed after each step: 0, p, 2p, ..., num_pixels (the last step may be smaller)."""
    if pixels_per_step < 1:
        raise ValueError(f"pixels_per_step must be >= 1, got {pixels_per_step}")
    steps = math.ceil(num_pixels / pixels_per_step)
    return (torch.arange(steps + 1) * pixels_per_step).clamp(max=num_pixels)


def auc(fractions: torch.Tensor, curves: torch.Tensor) -> torch.Tensor:
    """Area under curves [..., S+1] over fractions [S+1] in [0, 1] (trapezoid rule)."""
    return torch.trapezoid(curves, fractions.to(curves), dim=-1)


@dataclass
class FaithfulnessResult:
    """Insertion and deletion of B images: curves [B, S+1] over `fractions` [S+1] and their areas [B]."""

    fractions: torch.Tensor
    insertion: torch.Tensor
    deletion: torch.Tensor

    @property
    def insertion_auc(self) -> torch.Tensor:
        return auc(self.fractions, self.insertion)

    @property
    def deletion_auc(self) -> torch.Tensor:
        return auc(self.fractions, self.deletion)


def blur(images: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of images [B, 3, H, W]: the insertion curve's start."""
    from torchvision.transforms.functional import gaussian_blur  # here: the figures import this module, not torchvision

    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def _target_probability(predict, images, targets, rivals) -> torch.Tensor:
    """Softmax probability [n] of class targets [n] (over rivals [n, C] when given) under predict(images)."""
    scores = predict(images).float()
    if rivals is not None:
        scores = scores.masked_fill(~rivals, float("-inf"))
    return scores.softmax(-1).gather(1, targets[:, None])[:, 0]


@torch.no_grad()
def endpoint_probabilities(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                           targets: torch.Tensor, batch_size: int = 64, blur_kernel: int = BLUR_KERNEL,
                           blur_sigma: float = BLUR_SIGMA, rivals: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 3]: the target's probability on each image as it is, with every pixel deleted (the mean colour) and
    blurred: the ends of the deletion and insertion curves, the same for every map of one model and target (computed
    once, `insertion_deletion`'s `endpoints`)."""
    device = images.device
    targets = targets.to(device)
    rivals = None if rivals is None else rivals.to(device)
    blurred = blur(images, blur_kernel, blur_sigma)
    ends = torch.stack([images, torch.zeros_like(images), blurred], 1).flatten(0, 1)  # [B * 3, 3, H, W]
    index = torch.arange(len(images), device=device).repeat_interleave(3)
    chunks = [_target_probability(predict, ends[i:i + batch_size], targets[index[i:i + batch_size]],
                                  None if rivals is None else rivals[index[i:i + batch_size]])
              for i in range(0, len(ends), batch_size)]
    return torch.cat(chunks).view(len(images), 3).cpu().double()


@torch.no_grad()
def insertion_deletion(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: torch.Tensor,
    pixels_per_step: int | None = None,
    batch_size: int = 64,
    blur_kernel: int = BLUR_KERNEL,
    blur_sigma: float = BLUR_SIGMA,
    rivals: torch.Tensor | None = None,
    endpoints: torch.Tensor | None = None,
) -> FaithfulnessResult:
    """Insertion and deletion curves of normalised images [B, 3, H, W] explained by saliency maps [B, h, w].

    predict(images [n, 3, H, W]) -> class scores [n, C] (logits; softmax is applied here). targets [B]: the class
    whose probability is followed. rivals: bool [B, C], the classes each image's softmax runs over (contrast
    'siblings': the target's siblings); default every class. pixels_per_step: default W (RISE: 224 steps at
    224 x 224). endpoints: `endpoint_probabilities` of the same predict, images and targets, shared by the maps of
    one model (computed here when not given).
    """
    num_images, _, height, width = images.shape
    device = images.device
    rank = pixel_rank(upsample(saliency.to(device), (height, width)))  # [B, H*W]
    counts = step_counts(height * width, pixels_per_step or width).to(device)
    blurred = blur(images, blur_kernel, blur_sigma)
    num_steps = len(counts)
    targets = targets.to(device)
    rivals = None if rivals is None else rivals.to(device)
    if endpoints is None:
        endpoints = endpoint_probabilities(predict, images, targets, batch_size, blur_kernel, blur_sigma, rivals)
    # every (curve, image, inner step): curve 0 = deletion, 1 = insertion; the first and last steps are endpoints
    curve, image, step = (g.flatten() for g in torch.meshgrid(
        torch.arange(2, device=device), torch.arange(num_images, device=device),
        torch.arange(1, num_steps - 1, device=device), indexing="ij"))
    probabilities = torch.empty(len(curve), device=device)
    for start in range(0, len(curve), batch_size):
        c, b, s = curve[start:start + batch_size], image[start:start + batch_size], step[start:start + batch_size]
        changed = (rank[b] < counts[s][:, None]).view(-1, 1, height, width)
        deletion = (c == 0).view(-1, 1, 1, 1)
        start_image = torch.where(deletion, images[b], blurred[b])
        end_image = torch.where(deletion, torch.zeros_like(images[b]), images[b])
        perturbed = torch.where(changed, end_image, start_image)
        probabilities[start:start + batch_size] = _target_probability(
            predict, perturbed, targets[b], None if rivals is None else rivals[b])
    inner = probabilities.view(2, num_images, num_steps - 2).cpu().double()
    original, deleted, blurred_end = endpoints.to(inner).unbind(1)
    deletion = torch.cat([original[:, None], inner[0], deleted[:, None]], 1)
    insertion = torch.cat([blurred_end[:, None], inner[1], original[:, None]], 1)
    fractions = counts.cpu().double() / (height * width)
    return FaithfulnessResult(fractions, insertion=insertion, deletion=deletion)
