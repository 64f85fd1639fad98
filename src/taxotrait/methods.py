"""The registry of explanation methods: each name says how its maps are computed and which model it explains.

A method is a function of `MapInputs` returning maps [n, 2, h, w] on the patch grid (slot 0: the true class, slot 1:
the class its model predicts), registered with `@method(name, label, model)`. The evaluation (`saliency_maps`,
faithfulness, localization, the tables and figures) takes every registered method in registration order; adding a
baseline is one such function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .baselines import LinearProbe, attention_rollout, cam_maps
from .model import class_rivals


@dataclass
class MapInputs:
    """What a method's maps are made from, for n images of the evaluation subset.

    attention: Prompt-CAM's last-block attention [n, 2, heads, h, w] of the true and the predicted class's prompt;
    true_heads, predicted_heads: bool [n, heads], the trait heads of those classes (`evaluation.trait_head_masks`);
    probe, tokens: the linear probe and its frozen tokens [n, T, D]; truth: true classes [n]; probe_prediction: the
    probe's prediction among the rivals [n]; groups: sibling groups [C] (None under contrast 'rank'); names: the
    classes; images: a callable giving the eval crops in batches of `batch_size`.
    """

    attention: np.ndarray
    true_heads: np.ndarray
    predicted_heads: np.ndarray
    probe: LinearProbe
    tokens: torch.Tensor
    truth: torch.Tensor
    probe_prediction: np.ndarray
    groups: torch.Tensor | None
    names: list[str]
    batch_size: int
    images: Callable[[], Iterable[torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # in tables and figures
    model: str  # the model it explains: "prompt_cam" or "linear_probe"
    maps: Callable[[MapInputs], np.ndarray]


METHODS: dict[str, Method] = {}
MODEL_LABELS = {"prompt_cam": "Prompt-CAM", "linear_probe": "linear probe"}


def method(name: str, label: str, model: str):
    """Register the decorated function of `MapInputs` as the explanation method `name`."""
    if model not in MODEL_LABELS:
        raise ValueError(f"method {name}: model must be one of {list(MODEL_LABELS)}, got {model!r}")

    def register(maps: Callable[[MapInputs], np.ndarray]):
        METHODS[name] = Method(name, label, model, maps)
        return maps

    return register


# rows of the tables that are references rather than methods
REFERENCE_LABELS = {"random": "random point"}


def method_label(name: str) -> str:
    """The label of a registered method or of a reference row (`REFERENCE_LABELS`) in tables and figures."""
    return METHODS[name].label if name in METHODS else REFERENCE_LABELS.get(name, name)


def cam_rivals(groups: torch.Tensor | None, targets: torch.Tensor, names: list[str]) -> torch.Tensor | None:
    """The rivals [B, C] a CAM target is contrasted with: the class's siblings under contrast 'siblings'; None
    under 'rank' (the class score alone, as the paper)."""
    return None if groups is None else class_rivals(groups, targets, len(names))


def combine_heads(maps: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Mean over the chosen heads [n, heads] of maps [n, heads, h, w] -> [n, h, w]."""
    weights = chosen.astype(np.float64)
    weights /= np.clip(weights.sum(1, keepdims=True), 1, None)
    return np.einsum("nk,nkhw->nhw", weights, maps.astype(np.float64)).astype(np.float32)


def _both_slots(maps: np.ndarray) -> np.ndarray:
    """A class-agnostic map [n, h, w] in both slots."""
    return np.repeat(maps[:, None], 2, axis=1)


@method("prompt_cam_traits", "Prompt-CAM (trait heads)", "prompt_cam")
def prompt_cam_traits(x: MapInputs) -> np.ndarray:
    """The class prompt's attention averaged over the class's trait heads."""
    return np.stack([combine_heads(x.attention[:, 0], x.true_heads),
                     combine_heads(x.attention[:, 1], x.predicted_heads)], axis=1)


@method("prompt_cam_all", "Prompt-CAM (all heads)", "prompt_cam")
def prompt_cam_all(x: MapInputs) -> np.ndarray:
    """The class prompt's attention averaged over every head."""
    return x.attention.mean(2)


def _class_cam(name: str, x: MapInputs) -> np.ndarray:
    """A gradient CAM of the probe for the true class and, where the probe is wrong, for its prediction."""
    true = cam_maps(name, x.probe, x.tokens, x.truth, x.batch_size, cam_rivals(x.groups, x.truth, x.names))
    maps = _both_slots(true)
    wrong = np.flatnonzero(x.probe_prediction != x.truth.numpy())
    if len(wrong):
        predicted = torch.as_tensor(x.probe_prediction[wrong])
        maps[wrong, 1] = cam_maps(name, x.probe, x.tokens[wrong], predicted, x.batch_size,
                                  cam_rivals(x.groups, predicted, x.names))
    return maps


@method("grad_cam", "Grad-CAM", "linear_probe")
def grad_cam(x: MapInputs) -> np.ndarray:
    return _class_cam("grad_cam", x)


@method("layer_cam", "Layer-CAM", "linear_probe")
def layer_cam(x: MapInputs) -> np.ndarray:
    return _class_cam("layer_cam", x)


@method("finer_cam", "Finer-CAM", "linear_probe")
def finer_cam(x: MapInputs) -> np.ndarray:
    """Grad-CAM of the class against its rivals nearest in score (Zhang et al., CVPR 2025; `baselines.FinerTarget`)."""
    return _class_cam("finer_cam", x)


@method("eigen_cam", "Eigen-CAM", "linear_probe")
def eigen_cam(x: MapInputs) -> np.ndarray:
    """Class-agnostic: the first principal component of the probe's last-block activations."""
    return _both_slots(cam_maps("eigen_cam", x.probe, x.tokens, None, x.batch_size))


@method("rollout", "Rollout", "linear_probe")
def rollout(x: MapInputs) -> np.ndarray:
    """Class-agnostic: attention rollout of the frozen backbone."""
    return _both_slots(np.concatenate([attention_rollout(x.probe.backbone, images).float().cpu().numpy()
                                       for images in x.images()]))
