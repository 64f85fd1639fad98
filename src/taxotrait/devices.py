"""Where computations run: the device a setting names, and the precision used on it.

The device policy of every step that touches a model (cache_tokens, train, evaluate, extract_attention, mask_heads,
train_probes, saliency_maps, faithfulness): the model and its inputs go to the resolved device (`resolve_device`),
results come back to the CPU (`to_host`) before numpy, and on an accelerator (`accelerated`) training and scoring
run under bf16 autocast (`mixed_precision`). Each table records the device it was made on
(`str(device)`: 'cpu', 'cuda', 'cuda:1', ...).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .runner import ConfigError

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
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=accelerated(device))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def to_host(value):
    """A tensor (detached), or every tensor field of a dataclass, on the CPU: what numpy and the tables read."""
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: to_host(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value

