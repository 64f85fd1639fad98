"""Taxonomy-scale class counts on CPU: training memory grows linearly with C (scalable variant), not as C².

Each measurement runs `train` on a tiny ViT in a fresh process (`python tests/test_scale.py VARIANT C BATCH`) and
reports the growth of its peak resident memory during training (VmHWM, reset before training), so torch's own
allocations count.
The bound is a * C + b, with a derived from the model's sizes: every class prompt of every image of a batch keeps
the activations of one pass through the last block (a few dozen D-vectors, the MLP's 4D hidden layer included), and
every class has its prompt, gradient and two AdamW moments.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DIM, HEADS, TOKENS = 32, 4, 17  # conftest.make_vit: 32-d, 4 heads, 4x4 patches + CLS
BATCH, STEPS = 16, 4
FLOAT = 4


def bound_bytes(classes: int, batch: int = BATCH) -> float:
    """a * C + b: per class, 48 D-vectors of activations per image of the batch (the last block at the prompt:
    norms, q, attention output, projection, residuals, MLP 4D in and out, gradients) and 4 D-vectors of optimiser
    state; b: 48 MB for the allocator's and the loop's fixed costs."""
    a = (batch * 48 * DIM + 4 * DIM) * FLOAT
    return a * classes + 48e6


def measure(variant: str, classes: int, batch: int = BATCH) -> dict:
    """Peak RSS growth (bytes) of training `variant` at `classes` classes, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__)), variant, str(classes), str(batch)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_memory_is_linear_in_the_number_of_classes():
    results = [measure("scalable", classes) for classes in (2000, 4000)]
    for result in results:
        assert result["steps"] == STEPS and result["loss_finite"]
        assert result["peak_growth"] <= bound_bytes(result["classes"]), (result, bound_bytes(result["classes"]))
    # doubling C about doubles the memory (linear; the allocator's rounding of resident pages adds noise, seen up to
    # 2.5x); quadratic growth would quadruple it
    ratio = results[1]["peak_growth"] / results[0]["peak_growth"]
    assert 1.2 < ratio < 3.0, results


def test_extraction_and_masking_store_only_the_classes_asked_for(tmp_path):
    """At C = 3000: the attention file holds the maps of the true, predicted and sibling classes only (K slots, not
    C), masking works on each image's own class, and chunked scoring equals unchunked scoring."""
    import h5py
    import torch

    from conftest import make_vit
    from taxotrait.extract import extract_attention, sibling_classes
    from taxotrait.masking import greedy_head_masking
    from taxotrait.model import PromptCAM, PromptConfig

    classes, images = 3000, 6
    torch.manual_seed(0)
    model = PromptCAM(make_vit(), [f"taxon {c}" for c in range(classes)], PromptConfig("scalable", 1))
    tokens = model.frozen_tokens(torch.randn(images, 3, 32, 32))
    labels = torch.randint(classes, (images,))
    parents = [f"genus {c // 3}" for c in range(classes)]
    with torch.no_grad():
        full, _ = model.class_scores(model.last_block_input(tokens))
        chunked, _ = model.class_scores(model.last_block_input(tokens), chunk_size=512)
    assert torch.allclose(full, chunked, atol=1e-5)
    batches = [([f"img{i}" for i in range(3)], tokens[:3], labels[:3]),
               ([f"img{i}" for i in range(3, 6)], tokens[3:], labels[3:])]
    out = extract_attention(model, batches, images, tmp_path / "attention.h5", "species",
                            sibling_classes(parents, 2), chunk_size=512, progress=False)
    with h5py.File(out) as h5:
        assert h5["attention"].shape == (images, 4, HEADS, 4, 4)  # true, predicted, two siblings
        assert h5["scores"].shape == (images, 4) and len(h5["class_names"]) == classes
        assert (h5["classes"][:, 0] == labels.numpy()).all()
    result = greedy_head_masking(model, tokens, labels, chunk_size=512)
    assert result.removal_order.shape == (images, HEADS) and torch.equal(result.classes, labels)


def test_sibling_classes_are_linear_in_the_number_of_classes():
    """Every class's siblings at C = 200,000 (the top rank: every other class is a sibling) in well under a second
    of work per 10^5 classes, the same as the definition's on a small case."""
    import time

    from taxotrait.extract import sibling_classes

    parents = ["a", "b", "a", "a", "b", "c"]
    definition = [[j for j, q in enumerate(parents) if q == p and j != i][:2] for i, p in enumerate(parents)]
    assert sibling_classes(parents, 2) == definition == [[2, 3], [4], [0, 3], [0, 2], [1], []]
    assert sibling_classes(parents, 0) == [[]] * 6
    start = time.perf_counter()
    top = sibling_classes([""] * 200_000, 2)
    assert top[0] == [1, 2] and top[1] == [0, 2] and top[-1] == [0, 1]
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------------------------------------- the worker
def memory_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak) of this process, kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def start_peak_measurement() -> int:
    """Reset the peak resident memory to the current one (torch's imports alone peak near 1 GB) and return it,
    bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    rss = memory_kb("VmRSS")
    assert memory_kb("VmHWM") <= rss + 1024, "could not reset the peak resident memory"
    return rss * 1024


def worker(variant: str, classes: int, batch: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from conftest import make_vit
    from taxotrait.data import AugmentConfig
    from taxotrait.model import PromptCAM, PromptConfig
    from taxotrait.token_cache import TokenCache, TokenDataset, build_token_cache
    from taxotrait.train import TrainConfig, train

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp())
    paths = []
    for i in range(batch * STEPS):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    names = [f"taxon {c}" for c in range(classes)]
    model = PromptCAM(make_vit(), names, PromptConfig(variant, 1))
    augment = AugmentConfig(resize=32, crop=False, hflip=False)
    cache = TokenCache.open(build_token_cache(model, paths, folder / "tokens.npy", augment=augment, progress=False))
    data = TokenDataset(cache, rng.integers(0, classes, len(paths)))
    config = TrainConfig(epochs=1, batch_size=batch, optimizer="adamw", lr=1e-3, device="cpu",
                         prompt_init="uniform")
    before = start_peak_measurement()
    history = train(model, data, None, config, progress=False)
    peak = memory_kb("VmHWM") * 1024
    steps = len(paths) // batch
    return {"variant": variant, "classes": classes, "batch": batch, "steps": steps * len(history),
            "loss_finite": bool(np.isfinite(history["loss"]).all()), "peak_growth": peak - before}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(json.dumps(worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
