"""Checkpoints: trainable parameters plus metadata, loadable with ``torch.load(weights_only=True)``.

Also imports the authors' released checkpoints (Imageomics/Prompt_CAM) as ``reference``-variant models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from .backbone import AUTHORS_NORMALISATION, create_backbone, safe_torch_load, weights_digest
from .model import PromptCAM, PromptConfig
from .io import atomic_write

FORMAT = "taxotrait-promptcam-1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the backbone."""


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temporary name in the same folder, then rename (`atomic_write`): no partial file on failure."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def checkpoint_payload(model: PromptCAM, **metadata) -> dict:
    """What a checkpoint holds: format, model config, backbone digest, trainable parameters, extra metadata."""
    return {
        "format": FORMAT,
        "config": model.config(),
        "backbone_digest": model.backbone_digest,
        "state_dict": model.trainable_state_dict(),
        "metadata": metadata,
    }


def save_checkpoint(model: PromptCAM, path: str | os.PathLike, **metadata) -> Path:
    """Save the trainable parameters and metadata (e.g. rank=...) of `model` to `path`."""
    return atomic_save(checkpoint_payload(model, **metadata), path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a taxotrait checkpoint safely (no pickled code), checking its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = safe_torch_load(path)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a taxotrait checkpoint (format {FORMAT}); for the authors' files use "
                              "taxotrait.load_official_checkpoint")
    return payload


def model_from_payload(payload: dict, backbone: VisionTransformer, source: str = "checkpoint") -> PromptCAM:
    """Rebuild the PromptCAM described by a checkpoint payload on `backbone`, checking the backbone's weights."""
    config = payload["config"]
    digest = weights_digest(backbone)
    if payload.get("backbone_digest") and payload["backbone_digest"] != digest:
        raise CheckpointError(
            f"{source} was trained on backbone {config['backbone']} with weights digest "
            f"{payload['backbone_digest'][:12]}..., but the given backbone's weights have digest {digest[:12]}...: "
            "provide the same backbone weights file"
        )
    prompts = PromptConfig(config["variant"], config["prompt_depth"], config["num_prompts"])
    mean, std = config["normalisation"]
    model = PromptCAM(backbone, config["class_names"], prompts, (mean, std), config["backbone"],
                      config.get("class_parents"))
    model._backbone_digest = digest
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    missing = [key for key in missing if not key.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {missing}, unexpected {unexpected}")
    return model


def load_checkpoint(path: str | os.PathLike, backbone_weights: str | os.PathLike | None = None,
                    backbone: VisionTransformer | None = None) -> PromptCAM:
    """Load a taxotrait checkpoint; the backbone is built from its name and `backbone_weights` unless given."""
    payload = read_checkpoint(path)
    config = payload["config"]
    if backbone is None:
        backbone = create_backbone(config["backbone"], backbone_weights, config["img_size"])
    return model_from_payload(payload, backbone, source=str(path))


def load_official_checkpoint(path: str | os.PathLike, backbone: str | VisionTransformer,
                             class_names: list[str] | None = None) -> PromptCAM:
    """Import a checkpoint of the authors' code (``{'model_state_dict': ...}``) as a ``reference`` PromptCAM.

    `backbone` is the timm name the authors trained (e.g. ``vit_base_patch16_224.dino``) or a built ViT; the
    backbone's weights are taken from the checkpoint itself. The image size follows the checkpoint's position
    embedding; the input normalisation is theirs (mean = std = 0.5).
    """
    path = Path(path)
    try:
        state = safe_torch_load(path)
    except Exception as err:
        raise CheckpointError(f"cannot read the authors' checkpoint {path}: {err}") from err
    state = state.get("model_state_dict", state) if isinstance(state, dict) else state
    required = ("vpt.prompt_embeddings", "head.weight", "head.bias", "pos_embed")
    absent = [key for key in required if key not in state]
    if absent:
        raise CheckpointError(f"{path} is not a Prompt-CAM checkpoint of the authors' code: no {absent}")
    prompts = state["vpt.prompt_embeddings"]
    if isinstance(backbone, str):
        name = backbone
        probe = create_backbone(name, "random")
        prefix = 0 if probe.no_embed_class else probe.num_prefix_tokens
        grid = int(round((state["pos_embed"].shape[1] - prefix) ** 0.5))
        backbone = create_backbone(name, "random", grid * probe.patch_embed.patch_size[0])
    else:
        name = None
    backbone_state = {k: v for k, v in state.items() if not k.startswith(("vpt.", "head."))}
    try:
        missing, unexpected = backbone.load_state_dict(backbone_state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{path} does not fit backbone {name or type(backbone).__name__}: {err}") from err
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit backbone {name or type(backbone).__name__}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    num_blocks, num_classes, _ = prompts.shape
    if num_blocks != len(backbone.blocks):
        raise CheckpointError(f"{path} has prompts for {num_blocks} blocks, the backbone has {len(backbone.blocks)}")
    class_names = class_names or [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise CheckpointError(f"{path} has {num_classes} classes but {len(class_names)} class names were given")
    model = PromptCAM(backbone, class_names, PromptConfig("reference"), AUTHORS_NORMALISATION, name)
    with torch.no_grad():
        model.agnostic_prompts.copy_(prompts[:-1])
        model.class_prompts.copy_(prompts[-1])
        model.head.weight.copy_(state["head.weight"])
        model.head.bias.copy_(state["head.bias"])
    return model
