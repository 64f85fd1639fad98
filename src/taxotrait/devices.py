"""Where computations run: the device a setting names, and the precision used on it."""

from __future__ import annotations

import torch

from .runner import ConfigError


def resolve_device(name: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """'auto' (or None): CUDA when available, else the CPU. A CUDA device where there is none: ConfigError naming
    the setting `key`."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name} requested but no CUDA device is available")
    return device


def mixed_precision(device: torch.device):
    """The autocast context of computations on `device`: bf16 on CUDA, off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
