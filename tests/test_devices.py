"""The device policy (taxotrait.devices) of every step that touches a model, checked on a CPU.

A resolved device of "cpu:0" stands in for CUDA. It is a CPU device, so everything runs, but the spy below
(`StandInDevice`, a torch function mode) keeps track of which tensors live "on the device" — those moved there with
`.to(cpu:0)`, created with `device=cpu:0` or computed from such tensors — and refuses what CUDA refuses: an operation
mixing device tensors with host tensors, `.numpy()` of a device tensor, indexing a host tensor with device indices.
It also checks at every module call that the module's parameters are on the device, and records whether the call
ran under autocast. Moving to the host (`.cpu()`, `.to("cpu")`) makes a copy, as it does from a GPU.

Each step of the workflow then runs through its own code path (the functions workflow/scripts call), once taking the
accelerator branches (bf16 autocast, no CPU-only shortcut: `devices.ACCELERATED_TYPES` includes "cpu") and once the
CPU branches, and every table records the device it was made on.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from taxotrait import devices, evaluation
from taxotrait.steps import attention as attention_step
from taxotrait.steps import cache as cache_step
from taxotrait.steps import common
from taxotrait.steps import evaluate as evaluate_step
from taxotrait.steps import evaluation as evaluation_step
from taxotrait.steps import masking as masking_step
from taxotrait.steps import train as train_step
from taxotrait.dataset import prepare_files
from taxotrait.config import validate_config
from taxotrait.schema import defaults, with_defaults

REPO = Path(__file__).resolve().parents[1]
STAND_IN = torch.device("cpu", 0)  # "cpu:0": a CPU device that the spy tells apart from the host ("cpu")
# operations that may take tensors on both sides (copies between devices, indices on the host, a type query)
UNCHECKED = {"torch.Tensor.__getitem__", "torch.Tensor.__setitem__", "torch.Tensor.copy_",
             "_has_compatible_shallow_copy_type"}


class DeviceMisuse(AssertionError):
    """What CUDA would refuse, or a module called with its parameters off the device."""


def _device_argument(args, kwargs):
    """The target device of `Tensor.to(...)`: a device, a tensor whose device is taken, or None (dtype only)."""
    for value in (*args, kwargs.get("device"), kwargs.get("other")):
        if isinstance(value, (torch.device, str)) or isinstance(value, torch.Tensor):
            return value
    return None


class StandInDevice(TorchFunctionMode):
    """Tracks the tensors on the stand-in device and refuses the operations a CUDA device would refuse."""

    def __init__(self):
        super().__init__()
        self.where = WeakIdKeyDictionary()  # tensor -> "device" | "host"; tensors made outside torch calls: unknown
        self.module_calls = []  # (module class, ran under autocast)

    def __enter__(self):
        from_numpy = self.from_numpy = torch.from_numpy  # no torch function: tracked by hand, as host tensors

        def tracked(array):
            tensor = from_numpy(array)
            self.where[tensor] = "host"
            return tensor

        torch.from_numpy = tracked
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self.from_numpy
        return super().__exit__(*exc)

    def on_device(self, tensor) -> bool:
        return self.where.get(tensor) == "device"

    def on_host(self, tensor) -> bool:
        return self.where.get(tensor) == "host"

    def _mark(self, out, place: str):
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.where[leaf] = place

    def _copy(self, func, args, kwargs, place: str):
        """A transfer: always a new tensor (as between a GPU and the host), marked `place`."""
        out = func(*args, **kwargs)
        if out is args[0]:
            out = out.detach().clone().requires_grad_(out.requires_grad) if out.is_leaf else out.clone()
        self._mark(out, place)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = resolve_name(func) or getattr(func, "__name__", str(func))
        if name == "torch.Tensor.device.__get__":
            return STAND_IN if self.on_device(args[0]) else torch.device("cpu")
        if name in ("torch.Tensor.numpy", "torch.Tensor.__array__") and self.on_device(args[0]):
            raise DeviceMisuse(f"{name} of a tensor on the device {tuple(args[0].shape)}: bring it to the host first")
        if name == "torch.Tensor.cpu":
            return self._copy(func, args, kwargs, "host")
        if name == "torch.Tensor.to":
            target = _device_argument(args[1:], kwargs)
            if isinstance(target, torch.Tensor):
                target = STAND_IN if self.on_device(target) else torch.device("cpu")
            if target is not None:
                place = "device" if torch.device(target) == STAND_IN else "host"
                if place != ("device" if self.on_device(args[0]) else "host"):
                    return self._copy(func, args, kwargs, place)
        if name == "torch.Tensor.data.__set__":  # Module.to: param.data = the moved tensor
            func(*args, **kwargs)
            self.where[args[0]] = self.where.get(args[1], "host")
            return None
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name == "torch.Tensor.__getitem__" and self.on_host(args[0]):
            if any(self.on_device(t) for t in tensors[1:]):
                raise DeviceMisuse(f"{name}: a host tensor {tuple(args[0].shape)} indexed with device indices")
        elif name not in UNCHECKED:
            device = [t for t in tensors if self.on_device(t)]
            host = [t for t in tensors if self.on_host(t) and t.dim() > 0]  # CUDA takes CPU scalars
            if device and host:
                raise DeviceMisuse(f"{name} mixes tensors on the device {[tuple(t.shape) for t in device]} with "
                                   f"tensors on the host {[tuple(t.shape) for t in host]}")
        out = func(*args, **kwargs)
        if "device" in kwargs and kwargs["device"] is not None:
            place = "device" if torch.device(kwargs["device"]) == STAND_IN else "host"
        elif not tensors:
            place = "host"  # a factory without a device: the CPU
        elif any(self.on_device(t) for t in tensors):
            place = "device"
        else:  # from host tensors, or from tensors made outside torch calls (e.g. by autograd): unknown
            place = "host" if any(self.on_host(t) for t in tensors) else None
        if place and not (name.endswith("__set__") or name == "torch.Tensor.__setitem__"):
            self._mark(out, place)
        return out

    def check_module(self, module, inputs):
        """Forward pre-hook of every module: its parameters and buffers and its tensor inputs on the device."""
        off = [n for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
               if not self.on_device(t)]
        if off:
            raise DeviceMisuse(f"{type(module).__name__} called with parameters off the device: {off}")
        host = [tuple(t.shape) for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and self.on_host(t)]
        if host:
            raise DeviceMisuse(f"{type(module).__name__} called on host tensors {host}")
        self.module_calls.append((type(module).__name__, torch.is_autocast_enabled("cpu")))


def run_on_stand_in(step, config: dict) -> StandInDevice:
    """Run `step()` on the stand-in device, the shared backbone starting on the host (as in a fresh job)."""
    spy = StandInDevice()
    hook = register_module_forward_pre_hook(spy.check_module)
    try:
        with spy:
            common.backbone_of(config).cpu()
            step()
    finally:
        hook.remove()
    assert spy.module_calls, "the step called no module"
    return spy


SPECIES = {"Alpha a": ("O1", (220, 40, 40)), "Alpha b": ("O1", (40, 40, 220)), "Beta c": ("O2", (40, 200, 60))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A three-species image tree, prepared, and a config whose model steps and evaluation run on cpu:0."""
    root = tmp_path_factory.mktemp("devices")
    rows = ["order,species"]
    for k, (species, (order, colour)) in enumerate(SPECIES.items()):
        rows.append(f"{order},{species}")
        for split, n in (("train", 4), ("val", 1), ("test", 2)):
            (root / "images" / split / species).mkdir(parents=True)
            for i in range(n):
                grain = np.random.default_rng(10 * k + i).integers(0, 32, (36, 40, 3))
                pixels = np.clip(np.array(colour) + grain - 16, 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / split / species / f"{i}.png")
    (root / "taxonomy.csv").write_text("\n".join(rows) + "\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(ranks=["order", "species"], rank_overrides={})
    config["data"] = {"synthetic": None, "images": str(root / "images"), "manifest": None,
                      "taxonomy": str(root / "taxonomy.csv"), "max_reject_fraction": 0.0}
    config["backbone"] = {"name": "vit_tiny_patch16_224", "weights": "random", "img_size": 32, "antialias": False}
    config["augment"] = {"resize": 36, "crop": True, "hflip": True, "views": 1}
    config["train"].update(epochs=2, batch_size=4, device="cpu:0")
    config["attention"] = {"split": "test", "extra_classes": 1, "batch_size": 4}
    config["evaluation"] = {"images": 6, "batch_size": 16, "device": "cpu:0",
                            "faithfulness": {"images": 2, "pixels_per_step": 256, "finest_ranks": 1}}
    with_defaults(config)  # the keys the sections above leave out, as the workflow fills them in
    tables = {key: root / f"{key}.parquet" for key in ("manifest", "classes", "rejects")}
    prepare_files({"taxonomy": config["data"]["taxonomy"]}, tables, config["data"], config["ranks"])
    return root, config


@pytest.mark.parametrize("branches", ["accelerator", "cpu"])
def test_every_model_step_keeps_the_model_and_its_data_on_the_resolved_device(dataset, branches, monkeypatch,
                                                                            tmp_path):
    root, config = dataset
    accelerator = branches == "accelerator"
    if accelerator:
        monkeypatch.setattr(devices, "ACCELERATED_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(devices, "native_bf16", lambda device: accelerator)  # backbone.precision auto follows it
    out = tmp_path
    inputs = {"manifest": root / "manifest.parquet", "classes": root / "classes.parquet",
              "train_tokens": out / "train.tokens.npy", "eval_tokens": out / "eval.tokens.npy"}
    calls = {}

    def step(name, function):
        spy = run_on_stand_in(function, config)
        calls[name] = [autocast for _, autocast in spy.module_calls]

    for kind in ("train", "eval"):
        step(f"cache_tokens {kind}", lambda: cache_step.cache_tokens(kind, inputs["manifest"], inputs[f"{kind}_tokens"],
                                                                    config))
        assert json.loads((out / f"{kind}.tokens.npy.json").read_text())["device"] == "cpu:0"
    probes = [out / rank / "probe.pt" for rank in config["ranks"]]
    step("train_probes", lambda: evaluation_step.train_probes(inputs, {"probes": probes}, config))
    assert torch.load(probes[-1], weights_only=True)["metadata"]["device"] == "cpu:0"
    rank, folder, order = "species", out / "species", out / "order" / "model.pt"
    inputs.update(model=order)
    step("train order", lambda: train_step.train("order", inputs, {"model": order,
                                                                      "log_table": out / "order" / "log.parquet"}, config))
    inputs.update(model=folder / "model.pt", attention=folder / "attention.h5", heads=folder / "heads.parquet",
                  probe=probes[-1], saliency=folder / "saliency.h5", models=[order, folder / "model.pt"])
    step("train", lambda: train_step.train(rank, inputs, {"model": inputs["model"],
                                                             "log_table": folder / "train_log.parquet"}, config))
    step("evaluate", lambda: evaluate_step.evaluate(inputs, {"metrics": [out / "order" / "metrics.parquet",
                                                                    folder / "metrics.parquet"]}, config))
    step("extract_attention", lambda: attention_step.extract_attention(rank, inputs, {"attention": inputs["attention"]},
                                                                      config))
    step("mask_heads", lambda: masking_step.mask_heads(rank, inputs, {"heads": inputs["heads"]}, config))
    step("saliency_maps", lambda: evaluation_step.saliency_maps(rank, inputs, {"saliency": inputs["saliency"]}, config))
    step("faithfulness", lambda: evaluation_step.insertion_deletion_tables(
        rank, inputs, {"table": folder / "faithfulness.parquet", "curves": folder / "curves.parquet"}, config))

    # every table records the device it was made on
    for table in ("train_log", "metrics", "faithfulness"):
        frame = pd.read_parquet(folder / f"{table}.parquet")
        assert len(frame) and set(frame["device"]) == {"cpu:0"}, table
    for name in ("attention", "saliency"):
        with h5py.File(folder / f"{name}.h5") as h5:
            assert h5.attrs["device"] == "cpu:0"
    assert len(pd.read_parquet(inputs["heads"]))
    # mixed precision where it is safe: training and scoring on an accelerator, the frozen forwards over images
    # (cache, faithfulness) where bf16 is native (backbone.precision auto); never greedy masking (it compares nearly
    # equal scores)
    bf16 = {"train order", "train", "evaluate", "extract_attention", "train_probes", "saliency_maps", "faithfulness",
            "cache_tokens train", "cache_tokens eval"}
    for name, autocast in calls.items():
        assert any(autocast) == (accelerator and name in bf16), name


def test_the_spy_refuses_what_cuda_refuses(tiny_vit, images):
    """The checks above can fail: each misuse a CUDA device would reject is rejected on the stand-in."""
    def run(function):
        """function(the images on the host) on the stand-in, the model starting on the host."""
        spy, hook = StandInDevice(), register_module_forward_pre_hook(lambda m, i: spy.check_module(m, i))
        try:
            with spy:
                tiny_vit.cpu()
                return function(images.cpu())
        finally:
            hook.remove()

    with pytest.raises(DeviceMisuse, match="parameters off the device"):
        run(lambda x: tiny_vit(x.to(STAND_IN)))  # the model left on the host
    with pytest.raises(DeviceMisuse, match="on host tensors"):
        run(lambda x: tiny_vit.to(STAND_IN)(x))  # the inputs left on the host
    with pytest.raises(DeviceMisuse, match="mixes tensors on the device"):
        run(lambda x: x.to(STAND_IN) + x)
    with pytest.raises(DeviceMisuse, match="indexed with device indices"):
        run(lambda x: x[torch.zeros(2, dtype=torch.long, device=STAND_IN)])
    with pytest.raises(DeviceMisuse, match="numpy of a tensor on the device"):
        run(lambda x: tiny_vit.to(STAND_IN)(x.to(STAND_IN)).numpy())
    features = run(lambda x: tiny_vit.to(STAND_IN)(x.to(STAND_IN)).cpu().numpy())
    np.testing.assert_allclose(features, tiny_vit(images).numpy(), rtol=1e-5, atol=1e-6)


def test_a_step_that_leaves_its_model_on_the_host_is_caught(dataset, monkeypatch, tmp_path):
    """The bug this policy fixed (extract_attention ran the trained model wherever it was loaded, the CPU): with the
    model not moved, the step fails on the stand-in device."""
    root, config = dataset
    inputs = {"manifest": root / "manifest.parquet", "classes": root / "classes.parquet",
              "train_tokens": tmp_path / "train.tokens.npy", "eval_tokens": tmp_path / "eval.tokens.npy"}
    for kind in ("train", "eval"):
        cache_step.cache_tokens(kind, inputs["manifest"], inputs[f"{kind}_tokens"], config)
    inputs["model"] = tmp_path / "model.pt"
    train_step.train("species", inputs, {"model": inputs["model"], "log_table": tmp_path / "log.parquet"}, config)
    loaded = attention_step.trained_model
    monkeypatch.setattr(attention_step, "trained_model", lambda path, config, device=None: loaded(path, config))
    with pytest.raises(DeviceMisuse, match="off the device"):
        run_on_stand_in(lambda: attention_step.extract_attention("species", inputs, {"attention": tmp_path / "a.h5"},
                                                                config), config)


def test_the_paper_protocol_config_is_valid_and_the_faithfulness_settings_do_not_follow_the_host():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((REPO / "config" / "paper_evaluation.yaml").read_text())
    merged = with_defaults({**config, "evaluation": {**config["evaluation"], **paper["evaluation"]}})
    validate_config(merged, REPO / "workflow" / "schemas" / "config.schema.yaml")
    assert merged["evaluation"]["faithfulness"] == {"images": None, "pixels_per_step": None, "finest_ranks": None}
    assert merged["evaluation"]["images"] is None  # every image of attention.split
    assert config["evaluation"]["faithfulness"] == {"images": 8, "pixels_per_step": 6272, "finest_ranks": 1}
    assert defaults()["evaluation"]["faithfulness"] == config["evaluation"]["faithfulness"]  # schema = config.yaml


@pytest.mark.parametrize("native", [True, False])
def test_backbone_precision_auto_is_bf16_where_the_device_has_it_natively(native, monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert devices.native_bf16(cpu) is native and devices.native_bf16(torch.device("cuda"))
    with caplog.at_level("INFO", logger="taxotrait.devices"):
        assert devices.resolve_precision("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert f"backbone.precision: {'bf16' if native else 'fp32'} on cpu" in caplog.text
    assert devices.resolve_precision("fp32", cpu) == torch.float32  # named: whatever the device
    assert devices.resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(devices.ConfigError, match="backbone.precision: 'fp16' is not one of auto, fp32, bf16"):
        devices.resolve_precision("fp16", cpu)
    with devices.autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
    with devices.autocast(cpu, torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def test_frozen_forwards_run_in_pieces_on_the_cpu_and_whole_on_an_accelerator(monkeypatch):
    """devices.frozen_forward: on the CPU at most CPU_IMAGES_PER_FORWARD images per call, side by side on one
    thread each when torch has several, the same numbers as those pieces one after the other on one thread (and as one
    call, but for the last bit where the CPU's kernels differ by batch size); on an accelerator one call; without
    gradient, under the precision asked for, and torch's threads as they were."""
    import threading

    layer = torch.nn.Linear(5, 3)
    images = torch.randn(2 * devices.CPU_IMAGES_PER_FORWARD + 3, 5)
    calls = []

    def forward(x):
        calls.append((len(x), torch.is_autocast_enabled("cpu"), torch.is_grad_enabled(), torch.get_num_threads(),
                      threading.get_ident()))
        return layer(x)

    cpu, size, threads = torch.device("cpu"), devices.CPU_IMAGES_PER_FORWARD, torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one_after_the_other = torch.cat([layer(piece) for piece in images.split(size)])
        torch.set_num_threads(2)
        out = devices.frozen_forward(forward, images, cpu, torch.float32)
        torch.testing.assert_close(out, one_after_the_other, rtol=0, atol=0)
        torch.testing.assert_close(out, layer(images))
        assert not out.requires_grad and torch.get_num_threads() == 2
        assert sorted(c[0] for c in calls) == [3, size, size]
        assert {c[1:4] for c in calls} == {(False, False, 1)}  # fp32, no gradient, one thread each
        assert threading.get_ident() not in {c[4] for c in calls}
        calls.clear()
        torch.set_num_threads(1)
        devices.frozen_forward(forward, images, cpu, torch.bfloat16)
        assert [c[:3] for c in calls] == [(size, True, False), (size, True, False), (3, True, False)]
        monkeypatch.setattr(devices, "ACCELERATED_TYPES", ("cpu",))
        calls.clear()
        devices.frozen_forward(forward, images, cpu, torch.float32)
        assert [c[0] for c in calls] == [len(images)]
    finally:
        torch.set_num_threads(threads)


def test_a_registered_method_is_mapped_and_scored_like_the_others(dataset, monkeypatch, tmp_path):
    """Adding a baseline is one function and one registry entry: saliency.h5 then holds its maps and the
    faithfulness table its scores, for the model it names."""
    from taxotrait import methods

    root, config = dataset
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))

    @methods.method("corner", "corner prior", "linear_probe")
    def corner(x):  # all weight on the top-left patch, for the true and the predicted class
        maps = np.zeros((len(x.truth), 2, *x.attention.shape[-2:]), dtype=np.float32)
        maps[..., 0, 0] = 1
        return maps

    for module in (evaluation, evaluation_step):  # the modules that read the registry
        monkeypatch.setattr(module, "METHODS", methods.METHODS)
    rank, out = "species", tmp_path
    inputs = {"manifest": root / "manifest.parquet", "classes": root / "classes.parquet",
              "train_tokens": out / "train.tokens.npy", "eval_tokens": out / "eval.tokens.npy",
              "model": out / "model.pt", "attention": out / "attention.h5", "heads": out / "heads.parquet",
              "saliency": out / "saliency.h5"}
    for kind in ("train", "eval"):
        cache_step.cache_tokens(kind, inputs["manifest"], inputs[f"{kind}_tokens"], config)
    train_step.train(rank, inputs, {"model": inputs["model"], "log_table": out / "log.parquet"}, config)
    attention_step.extract_attention(rank, inputs, {"attention": inputs["attention"]}, config)
    masking_step.mask_heads(rank, inputs, {"heads": inputs["heads"]}, config)
    probes = [out / f"{r}.probe.pt" for r in config["ranks"]]
    evaluation_step.train_probes(inputs, {"probes": probes}, config)
    inputs["probe"] = probes[-1]
    evaluation_step.saliency_maps(rank, inputs, {"saliency": inputs["saliency"]}, config)
    table = out / "faithfulness.parquet"
    evaluation_step.insertion_deletion_tables(rank, inputs, {"table": table, "curves": out / "curves.parquet"}, config)

    with h5py.File(inputs["saliency"]) as h5:
        names = [str(name) for name in h5.attrs["methods"]]
        assert names == [*methods.METHODS] and names[-1] == "corner"
        attention = np.zeros((len(h5["label"]), 2, 1, *h5.attrs["grid"]))
        np.testing.assert_array_equal(h5["maps"][:, -1], corner(SimpleNamespace(truth=h5["label"][:],
                                                                                attention=attention)))
        assert h5["maps"][:, names.index("grad_cam")].std() > 0  # the others are still computed
    scores = pd.read_parquet(table).set_index("method")
    assert list(scores.index) == names
    assert scores.loc["corner", "model"] == "linear_probe" and 0 <= scores.loc["corner", "insertion"] <= 1
    assert methods.method_label("corner") == "corner prior"
