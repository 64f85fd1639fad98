"""taxotrait: Prompt-CAM trait discovery at every rank of a taxonomy.

The main entry points are exported lazily, so that light modules (tables, summaries) do not import torch.
"""

_EXPORTS = {
    "PromptCAM": "model", "PromptConfig": "model", "create_backbone": "backbone",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "load_official_checkpoint": "checkpoint",
    "greedy_head_masking": "masking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'taxotrait' has no attribute {name!r}")
