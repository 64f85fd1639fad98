"""Where computations run: the device a setting names, and the precision used on it.

The device policy of every step that touches a model (cache_tokens, train, evaluate, extract_attention, mask_heads,
train_probes, saliency_maps, faithfulness): the model and its inputs go to the resolved device (`resolve_device`),
results come back to the CPU (`to_host`) before numpy, and on an accelerator (`accelerated`) training and scoring
run under bf16 autocast (`mixed_precision`). Each table records the device it was made on
(`str(device)`: 'cpu', 'cuda', 'cuda:1', ...).

The frozen backbone's forward passes over images (the token cache, evaluation's perturbed images) follow
`backbone.precision` (`resolve_precision`): 'auto' is bf16 autocast wherever the device computes bf16 natively (CUDA; a
CPU with AVX512-BF16 or AMX, where it halves the time), fp32 elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import ConfigError

log = logging.getLogger("taxotrait.devices")

# Device types with the accelerator code paths: bf16 autocast, and no CPU-only shortcut (train.keys_values_gb).
ACCELERATED_TYPES = ("cuda",)


def resolve_device(name: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """'auto' (or None): CUDA when available, else the CPU. A CUDA device where there is none: ConfigError naming
    the setting `key`. Logged as '<key>: <device>'."""
    if name is None or name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{key}: {name} requested but no CUDA device is available")
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    log.info("%s: %s%s", key, device, gpu)  # every model step's log says where it ran (make gpu-check reads it)
    return device


def accelerated(device: torch.device) -> bool:
    """Whether `device` takes the accelerator code paths (`ACCELERATED_TYPES`)."""
    return device.type in ACCELERATED_TYPES


def mixed_precision(device: torch.device):
    """The autocast context of computations on `device`: bf16 on an accelerator, off elsewhere."""
    return autocast(device, torch.bfloat16 if accelerated(device) else torch.float32)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products natively: CUDA, or a CPU with AVX512-BF16 or AMX tiles."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(name: str | None, device: torch.device, key: str = "backbone.precision") -> torch.dtype:
    """The compute dtype that setting `key` names on `device`: 'auto' (or None) is bf16 where `device` has it natively
    (`native_bf16`), else fp32; 'bf16' and 'fp32' as named. Logged as '<key>: <dtype> on <device>'."""
    if name is None or name == "auto":
        name = "bf16" if native_bf16(device) else "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"{key}: {name!r} is not one of auto, {', '.join(PRECISIONS)}")
    log.info("%s: %s on %s", key, name, device)
    return PRECISIONS[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context computing in `dtype` on `device` (none for fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# Images per frozen forward on the CPU, where a smaller batch runs faster (its activations stay in the CPU's caches),
# and the pieces run side by side, one per thread, rather than each spread over the threads: ViT-S/14 on 2 cores,
# about 90 ms per image against 99 ms for the pieces one after the other and 106 ms for 64 at once (bench/RESULTS.md)
CPU_IMAGES_PER_FORWARD = 16


def frozen_forward(forward, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`forward(images)` without gradient, computing in `dtype` (`autocast`): the token cache's and the
    faithfulness's passes over images. On the CPU in pieces of `CPU_IMAGES_PER_FORWARD` images, as many at once as
    torch has threads, each on one thread (the same numbers as one after the other), concatenated."""

    def run(piece):  # grad mode and autocast are per thread
        with torch.no_grad(), autocast(device, dtype):
            return forward(piece)

    threads = torch.get_num_threads()
    if accelerated(device) or len(images) <= CPU_IMAGES_PER_FORWARD:
        return run(images)
    pieces = images.split(CPU_IMAGES_PER_FORWARD)
    if threads == 1:
        return torch.cat([run(piece) for piece in pieces])
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            return torch.cat(list(pool.map(run, pieces)))
    finally:
        torch.set_num_threads(threads)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def to_host(value):
    """A tensor (detached), or every tensor field of a dataclass, on the CPU: what numpy and the tables read."""
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: to_host(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value

