import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer


def make_vit(reg_tokens: int = 0, layer_scale: float | None = 0.5, img_size: int = 32, patch: int = 8, seed: int = 0):
    """A tiny random timm ViT with non-trivial norms, frozen like a real backbone."""
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=img_size, patch_size=patch, embed_dim=32, depth=3, num_heads=4, num_classes=0,
        reg_tokens=reg_tokens, init_values=layer_scale, qkv_bias=True,
    )
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "norm" in name:  # LayerNorms start at identity; perturb so they matter
                p.add_(0.1 * torch.randn_like(p))
            if name in ("cls_token", "pos_embed") or "reg_token" in name:
                p.normal_(0, 0.5)
    return vit.requires_grad_(False).eval()


@pytest.fixture
def tiny_vit():
    return make_vit()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def heads_table(rows, columns, **fixed):
    """A heads.parquet table (`taxotrait.extract.HEADS_COLUMNS`) of `rows` with these `columns`; the other columns are
    `fixed` or, where not given: rank species, contrast rank, each taxon its own prompt, removal in head order, scores
    1.0 before and 0.5 after removal, margins over a fixed rival at 1.0, the drop alone that of the removal."""
    from taxotrait.extract import HEADS_COLUMNS

    frame = pd.DataFrame(rows, columns=columns).assign(**fixed)
    defaults = {"rank": "species", "contrast": "rank", "spread": 0.1, "prompt": lambda f: f["taxon"],
                "removal_step": lambda f: f["head"], "score_before_removal": 1.0, "score_after_removal": 0.5,
                "margin_before_removal": lambda f: f["score_before_removal"] - 1.0,
                "margin_after_removal": lambda f: f["score_after_removal"] - 1.0,
                "score_drop_alone": lambda f: f["score_before_removal"] - f["score_after_removal"]}
    for column, value in defaults.items():
        if column not in frame:
            frame[column] = value(frame) if callable(value) else value
    return frame.astype(HEADS_COLUMNS)[list(HEADS_COLUMNS)]
