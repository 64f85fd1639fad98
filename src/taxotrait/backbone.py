"""Frozen timm ViT backbones: creation by name (a timm name, or an OpenCLIP backbone of `OPEN_CLIP_BACKBONES`), local
weight files (timm's or open_clip's), the offline default, digests."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

OFFLINE_BACKBONE = "vit_small_patch14_dinov2.lvd142m"

RANDOM_WEIGHTS_SEED = 0  # backbone.weights: random

# Input normalisation used by the authors' released models.
AUTHORS_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# open_clip's preprocessing, for OpenCLIP image towers: CLIP's mean and std
CLIP_NORMALISATION = {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
# open_clip's weights files on the hub: its default (every OpenCLIP repository has it; read without unpickling), then
# the safetensors one that newer uploads add
OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")


@dataclass(frozen=True)
class OpenClipBackbone:
    """The image tower of an OpenCLIP model: the timm ViT of its architecture and activation, and the Hugging Face
    repository holding its open_clip weights file (the first of `files` there)."""

    timm_name: str
    hub_id: str
    files: tuple[str, ...] = OPEN_CLIP_FILES


# backbone.name -> the OpenCLIP model; its image tower is read from open_clip's weights file, normalised with CLIP's
# mean and std
OPEN_CLIP_BACKBONES = {
    "bioclip": OpenClipBackbone("vit_base_patch16_clip_quickgelu_224", "imageomics/bioclip"),  # ViT-B/16, QuickGELU
    "bioclip-2": OpenClipBackbone("vit_large_patch14_clip_224", "imageomics/bioclip-2"),  # ViT-L/14, GELU
}


class BackboneWeightsError(RuntimeError):
    """The backbone's pretrained weights cannot be found or read."""


class UnsafeFileError(ValueError):
    """A weights or checkpoint file holds pickled Python objects, which are never unpickled."""


def safe_torch_load(path: str | os.PathLike):
    """`torch.load(path, weights_only=True)` on CPU: tensors, numbers, strings and containers only. A file that holds
    other pickled Python objects (which could run code when unpickled) raises UnsafeFileError naming the file and the
    object; other read errors propagate."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise  # not a pickle at all, or a corrupt one
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"an object of type {found.group(1)}" if found else "Python objects other than tensors"
        raise UnsafeFileError(
            f"{path}: refused: the file holds {what}, and taxotrait never unpickles Python objects "
            "(torch.load(weights_only=True)); save plain tensors instead, e.g. torch.save(model.state_dict(), path)"
        ) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.pt/.bin weights file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = safe_torch_load(path)
    except Exception as err:  # corrupt file, wrong format, pickled code
        raise BackboneWeightsError(f"cannot read backbone weights {path}: {err}") from err
    for key in ("model", "state_dict", "model_state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


HUB_PROBE_TIMEOUT = 3.0  # seconds: how long a connectivity probe waits before the weights count as unreachable
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches from a Hugging Face repo, in order


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def pretrained_sources(name: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Where the pretrained weights of `name` come from: ([(Hugging Face repo, file), ...], [url, ...]); timm's, or an
    OpenCLIP backbone's repository."""
    if name in OPEN_CLIP_BACKBONES:
        clip = OPEN_CLIP_BACKBONES[name]
        return [(clip.hub_id, file) for file in clip.files], []
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is None:
        return [], []
    hub, urls = [], [cfg.url] if cfg.url else []
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        hub = [(cfg.hf_hub_id, file) for file in files]
    return hub, urls


def cached_weights(name: str) -> Path | None:
    """A pretrained weights file of `name` already on this machine (Hugging Face hub cache or torch hub cache)."""
    from huggingface_hub import try_to_load_from_cache

    hub, urls = pretrained_sources(name)
    for repo, file in hub:
        repo, _, revision = repo.partition("@")
        found = try_to_load_from_cache(repo, file, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    for url in urls:
        found = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if found.suffix in (".pth", ".pt", ".bin", ".safetensors") and found.is_file():
            return found
    return None


def reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to `url`'s host (or to the configured HTTPS proxy) opens within `timeout` seconds."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    target = urlparse(proxy if proxy else url)
    port = target.port or (443 if target.scheme in ("https", "") else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _what_to_provide(name: str) -> str:
    from huggingface_hub import constants

    hub, urls = pretrained_sources(name)
    if hub:
        repo, file = hub[0]
        repo, _, revision = repo.partition("@")
        where = f"{constants.ENDPOINT}/{repo}/resolve/{revision or 'main'}/{file}"
    elif urls:
        where = urls[0]
    else:
        return f"timm has no pretrained weights for '{name}'"
    timm_way = "" if name in OPEN_CLIP_BACKBONES else (
        f" (or there run timm.create_model('{name}', pretrained=True) and save its state_dict())")
    return (f"download {where} on a connected machine{timm_way}, copy it here and set `backbone.weights` in the config "
            f"to that file (`backbone: {{name: {name}, weights: path/to/{os.path.basename(urlparse(where).path)}}}`); "
            "or put it in the Hugging Face cache and keep HF_HUB_OFFLINE=1")


def download_open_clip(clip: OpenClipBackbone) -> Path:
    """The open_clip weights file of `clip`, downloaded from its Hugging Face repository (the first of its file names
    the repository holds) into the Hugging Face cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for file in clip.files:
        try:
            return Path(hf_hub_download(clip.hub_id, file))
        except EntryNotFoundError as err:
            absent = err
    raise absent


def _pretrained_file(name: str) -> Path | None:
    """The pretrained weights of `name` as a local file: from the Hugging Face (or torch hub) cache, or downloaded for
    an OpenCLIP backbone; None when timm downloads them itself. Offline (HF_HUB_OFFLINE), or when the hub does not
    answer a `HUB_PROBE_TIMEOUT`-second connection probe, BackboneWeightsError says at once which file to provide."""
    cached = cached_weights(name)
    if cached is not None:
        return cached
    hub, urls = pretrained_sources(name)
    if hub and _hub_offline():
        raise BackboneWeightsError(f"the pretrained weights of backbone '{name}' are not in the Hugging Face cache "
                                   f"and HF_HUB_OFFLINE is set: {_what_to_provide(name)}.")
    if hub or urls:
        from huggingface_hub import constants

        probe = constants.ENDPOINT if hub else urls[0]
        if not reachable(probe):
            raise BackboneWeightsError(
                f"cannot download the pretrained weights of backbone '{name}': {urlparse(probe).hostname} is not "
                f"reachable (no network?) and they are not cached: {_what_to_provide(name)}.")
    if name not in OPEN_CLIP_BACKBONES:
        return None
    try:
        return download_open_clip(OPEN_CLIP_BACKBONES[name])
    except Exception as err:
        raise BackboneWeightsError(f"cannot download the pretrained weights of backbone '{name}' "
                                   f"({type(err).__name__}: {err}): {_what_to_provide(name)}.") from err


def is_open_clip(state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` is an OpenCLIP model's, its ViT image tower under `visual.` (as timm's checkpoint filter reads
    it; the text tower's keys are not read)."""
    return "visual.class_embedding" in state or "module.visual.class_embedding" in state


def create_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    img_size: int = 224,
    antialias: bool = True,
) -> VisionTransformer:
    """Create the frozen timm ViT `name` at `img_size`: a timm name, or an OpenCLIP backbone of `OPEN_CLIP_BACKBONES`
    (e.g. ``bioclip``: its timm ViT).

    `weights` is a local .safetensors/.pth/.bin file (timm's layout, or an OpenCLIP model's: its image tower is read,
    strictly, and its text tower left out), ``"random"`` for timm's random initialisation drawn from seed
    `RANDOM_WEIGHTS_SEED` (the same weights in every process: tests, benchmarks, the GPU check), or None for the
    pretrained weights (`_pretrained_file`): taken from the Hugging Face (or torch hub) cache when there, read like a
    local file (no network access); otherwise downloaded, unless offline. An OpenCLIP backbone or weights file is
    normalised with CLIP's mean and std, as open_clip does. Position embeddings are resampled to the grid of
    `img_size` with bicubic interpolation (`antialias` as timm's default, True).
    """
    if weights is None:
        weights = _pretrained_file(name)
    if weights is None:
        try:
            model = timm.create_model(name, pretrained=True, img_size=img_size, num_classes=0)
        except Exception as err:
            raise BackboneWeightsError(
                f"cannot obtain pretrained weights for backbone '{name}' ({type(err).__name__}: {err}). "
                f"Without network access, {_what_to_provide(name)}."
            ) from err
    else:
        model = _backbone_with_weights(name, weights, img_size, antialias)
    if not isinstance(model, VisionTransformer):
        raise BackboneWeightsError(f"backbone '{name}' is a {type(model).__name__}, not a timm VisionTransformer")
    model.requires_grad_(False)
    return model.eval()


def _backbone_with_weights(name: str, weights: str | os.PathLike, img_size: int, antialias: bool) -> torch.nn.Module:
    """timm's model `name` (or the timm ViT of an OpenCLIP backbone) at `img_size` with `weights`: a file, or
    "random"."""
    clip = OPEN_CLIP_BACKBONES.get(name)
    timm_name = clip.timm_name if clip else name
    state = None if str(weights) == "random" else read_state_dict(weights)
    open_clip_file = state is not None and is_open_clip(state)
    normalisation = CLIP_NORMALISATION if clip or open_clip_file else None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)  # "random": the same weights in every process
            model = timm.create_model(timm_name, pretrained=False, pretrained_cfg_overlay=normalisation,
                                      img_size=img_size, num_classes=0)
    except Exception as err:
        raise BackboneWeightsError(f"unknown or unsupported timm backbone '{timm_name}': {err}") from err
    if state is None:
        return model
    layout = " (timm's names for the file's image-tower keys, visual.*)" if open_clip_file else ""
    state = checkpoint_filter_fn(state, model, antialias=antialias)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in model.state_dict()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneWeightsError(
            f"weights file {weights} does not fit backbone '{name}'{f' (timm {timm_name})' if clip else ''}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}{layout}"
        )
    return model


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


def tokens_entering(vit: VisionTransformer, images: torch.Tensor, block: int) -> torch.Tensor:
    """The token sequence [B, T, D] (prefix tokens, then patches) entering block `block` of `vit`."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for layer in vit.blocks[:block]:
        x = layer(x)
    return x
