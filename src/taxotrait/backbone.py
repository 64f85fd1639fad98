"""Frozen timm ViT backbones: creation by name, local weight files, the offline default, digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .runner import OFFLINE_WEIGHTS  # noqa: F401  (re-exported: the converted offline DINOv2 ViT-S/14)

OFFLINE_BACKBONE = "vit_small_patch14_dinov2.lvd142m"

# Input normalisation used by the authors' released models.
AUTHORS_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class BackboneWeightsError(RuntimeError):
    """The backbone's pretrained weights cannot be found or read."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.pt/.bin weights file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, wrong format, pickled code
        raise BackboneWeightsError(f"cannot read backbone weights {path}: {err}") from err
    for key in ("model", "state_dict", "model_state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def create_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    img_size: int = 224,
    antialias: bool = True,
) -> VisionTransformer:
    """Create the frozen timm ViT `name` at `img_size`.

    `weights` is a local .safetensors/.pth file, ``"random"`` for random weights (tests, benchmarks), or None to
    let timm fetch the pretrained weights (needs network or a filled hub cache). Position embeddings are resampled
    to the grid of `img_size` with bicubic interpolation (`antialias` as timm's default, True).
    """
    kwargs = dict(img_size=img_size, num_classes=0)
    if weights is None:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:
            raise BackboneWeightsError(
                f"cannot obtain pretrained weights for backbone '{name}' ({type(err).__name__}: {err}). "
                "Without network access, download the weights on a connected machine "
                f"(e.g. timm.create_model('{name}', pretrained=True) or the model's Hugging Face page) and set "
                "`backbone.weights` in the config to the local .safetensors or .pth file."
            ) from err
    else:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except Exception as err:
            raise BackboneWeightsError(f"unknown or unsupported timm backbone '{name}': {err}") from err
        if str(weights) != "random":
            state = checkpoint_filter_fn(read_state_dict(weights), model, antialias=antialias)
            state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in model.state_dict()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise BackboneWeightsError(
                    f"weights file {weights} does not fit backbone '{name}': "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
                )
    if not isinstance(model, VisionTransformer):
        raise BackboneWeightsError(f"backbone '{name}' is a {type(model).__name__}, not a timm VisionTransformer")
    model.requires_grad_(False)
    return model.eval()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (sorted by name): identifies the exact weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_normalisation(model: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the backbone was pretrained with."""
    cfg = getattr(model, "pretrained_cfg", {})
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
