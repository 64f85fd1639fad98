"""Frozen timm ViT backbones: creation by name, local weight files, the offline default, digests."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

OFFLINE_BACKBONE = "vit_small_patch14_dinov2.lvd142m"

RANDOM_WEIGHTS_SEED = 0  # backbone.weights: random

# Input normalisation used by the authors' released models.
AUTHORS_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


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
    """Where timm gets the pretrained weights of `name`: ([(Hugging Face repo, file), ...], [url, ...])."""
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
    return (f"download {where} on a connected machine (or there run timm.create_model('{name}', pretrained=True) and "
            "save its state_dict()), copy it here and set `backbone.weights` in the config to that file; or put it in "
            "the Hugging Face cache and keep HF_HUB_OFFLINE=1")


def create_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    img_size: int = 224,
    antialias: bool = True,
) -> VisionTransformer:
    """Create the frozen timm ViT `name` at `img_size`.

    `weights` is a local .safetensors/.pth file, ``"random"`` for timm's random initialisation drawn from seed
    `RANDOM_WEIGHTS_SEED` (the same weights in every process: tests, benchmarks, the GPU check), or None for
    timm's pretrained weights: taken from the Hugging Face (or torch hub) cache when there, read like a local file
    (no network access); otherwise downloaded, unless HF_HUB_OFFLINE is set or the hub does not answer a
    `HUB_PROBE_TIMEOUT`-second connection probe, in which case BackboneWeightsError says at once which file to
    provide. Position embeddings are resampled to the grid of `img_size` with bicubic interpolation (`antialias` as
    timm's default, True).
    """
    kwargs = dict(img_size=img_size, num_classes=0)
    if weights is None:
        cached = cached_weights(name)
        if cached is not None:
            return create_backbone(name, cached, img_size, antialias)
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
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:
            raise BackboneWeightsError(
                f"cannot obtain pretrained weights for backbone '{name}' ({type(err).__name__}: {err}). "
                f"Without network access, {_what_to_provide(name)}."
            ) from err
    else:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_WEIGHTS_SEED)  # "random": the same weights in every process
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


def tokens_entering(vit: VisionTransformer, images: torch.Tensor, block: int) -> torch.Tensor:
    """The token sequence [B, T, D] (prefix tokens, then patches) entering block `block` of `vit`."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for layer in vit.blocks[:block]:
        x = layer(x)
    return x
