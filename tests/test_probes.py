"""The linear probe (the CAM baselines' classifier) trained by minibatches: the same fit as a full-batch one, the
sibling softmax scoring siblings only, and the step reading the token caches a batch at a time."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from taxotrait.baselines import fit_linear_probe, load_probe, rival_accuracy
from taxotrait.dataset import class_names, class_parents, labels
from taxotrait.model import class_rivals, rival_prediction, sibling_groups
from taxotrait.steps import cache as cache_step
from taxotrait.steps import common
from taxotrait.steps import evaluation as evaluation_step
from taxotrait.token_cache import TokenCache, TokenDataset
from taxotrait.train import contrast_loss
from test_devices import dataset  # noqa: F401 (a fixture: a prepared three-species image tree and its config)

GROUPS = torch.tensor([0, 0, 1, 1])  # two families of two sibling classes


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CountingRows:
    """An array [n, D] that records how many rows each read asks for."""

    def __init__(self, array: np.ndarray):
        self.array, self.reads = array, []

    def __len__(self):
        return len(self.array)

    @property
    def shape(self):
        return self.array.shape

    def __getitem__(self, rows):
        self.reads.append(len(rows))
        return self.array[rows]


def overlapping_classes(n: int, seed: int, classes: int = 4, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes that overlap (no probe gets them all right), features of different scales and offsets."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    y = torch.randint(classes, (n,), generator=g)
    x = (centres[y] + 1.6 * torch.randn(n, dim, generator=g)) * torch.logspace(-1, 1, dim) + 2
    return x, y


def objective(x, y, weight, bias, l2, groups):
    """The probe's loss: mean sibling cross-entropy plus l2 * |weight|^2."""
    losses, counted = contrast_loss(x.double() @ weight.double().T + bias.double(), y, class_rivals(groups, y, 4))
    return (losses[counted].mean() + l2 * weight.double().pow(2).sum()).item()


def full_batch_fit(x, y, l2, groups):
    """The same objective minimised by full-batch L-BFGS in float64 (how the probe was fitted before)."""
    weight = torch.zeros(4, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=2000, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                  tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        losses, counted = contrast_loss(x.double() @ weight.T + bias, y, class_rivals(groups, y, 4))
        loss = losses[counted].mean() + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


def test_minibatch_probe_reaches_the_full_batch_fit_reading_the_features_in_batches():
    x, y = overlapping_classes(3000, seed=1)
    val_x, val_y = overlapping_classes(300, seed=2)
    test_x, test_y = overlapping_classes(1000, seed=3)
    train, val = CountingRows(x.numpy()), CountingRows(val_x.numpy())
    weight, bias, l2 = fit_linear_probe(train, y, 4, val, val_y, groups=GROUPS, batch_size=64)
    # memory bounded by the batch: every read asks for 64 rows at most, over many passes
    assert max(train.reads) == 64 and max(val.reads) <= 64 and sum(train.reads) >= 10 * len(x)
    reference = full_batch_fit(x, y, l2, GROUPS)
    assert objective(x, y, weight, bias, l2, GROUPS) <= objective(x, y, *reference, l2, GROUPS) + 2e-3
    ours, theirs = (rival_accuracy(test_x, test_y, w[None], b[None], GROUPS)[0].item() for w, b in (
        (weight, bias), reference))
    assert 0.5 < theirs < 0.95 and abs(ours - theirs) <= 0.01
    # rival_accuracy is the accuracy of rival_prediction on the full scores
    prediction = rival_prediction(test_x @ weight.T + bias, test_y, GROUPS)
    assert ours == pytest.approx((prediction == test_y).double().mean().item())


def test_sibling_probe_scores_each_image_against_its_siblings_only():
    x, y = overlapping_classes(400, seed=4)
    y = y % 2  # images of family 0 alone: classes 2 and 3 are no image's siblings
    weight, bias, _ = fit_linear_probe(x, y, 4, groups=GROUPS, batch_size=32)
    assert weight[:2].abs().sum() > 0 and (weight[2:] == 0).all() and (bias[2:] == 0).all()  # never scored
    flat_weight, _, _ = fit_linear_probe(x, y, 4, batch_size=32)  # contrast 'rank': every class is a rival
    assert (flat_weight[2:] != 0).any()
    with pytest.raises(ValueError, match="no training image has a class with a rival"):
        fit_linear_probe(x, torch.zeros(400, dtype=torch.long), 2, groups=torch.tensor([0, 1]))


def test_train_probes_reads_the_token_caches_a_batch_at_a_time(dataset, tmp_path, monkeypatch):  # noqa: F811
    root, config = dataset
    config = copy.deepcopy(config)
    config["evaluation"]["batch_size"] = 2
    inputs = {"manifest": root / "manifest.parquet", "classes": root / "classes.parquet",
              "train_tokens": tmp_path / "train.tokens.npy", "eval_tokens": tmp_path / "eval.tokens.npy"}
    for kind in ("train", "eval"):
        cache_step.cache_tokens(kind, inputs["manifest"], inputs[f"{kind}_tokens"], config)
    requested = []

    class CountingTokens(TokenDataset):
        def __getitems__(self, items):
            requested.append(len(items))
            return super().__getitems__(items)

    monkeypatch.setattr(evaluation_step, "TokenDataset", CountingTokens)
    probes = [tmp_path / rank / "probe.pt" for rank in config["ranks"]]
    evaluation_step.train_probes(inputs, {"probes": probes}, config)
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    assert max(requested) == 2 and sum(requested) == len(manifest)  # every image once, two at a time
    assert sorted(path.name for path in (tmp_path / "order").iterdir()) == ["probe.pt"]  # no features left behind
    # each file's top-1 is its probe's own decisions on the test images, among the siblings of the true class
    cache, test = TokenCache.open(inputs["eval_tokens"]), manifest[manifest["split"] == "test"]
    tokens = torch.from_numpy(cache.tokens[cache.index(test["path"]), 0].astype(np.float32))
    for rank, path in zip(config["ranks"], probes):
        probe, meta = load_probe(path, common.backbone_of(config))
        truth = torch.from_numpy(labels(test, classes, rank).to_numpy(copy=True))
        with torch.no_grad():
            scores = probe.forward_tokens(tokens)
        groups = sibling_groups(class_parents(classes, rank))
        top1 = (rival_prediction(scores, truth, groups) == truth).double().mean().item()
        assert probe.class_names == class_names(classes, rank) and meta["contrast"] == "siblings"
        assert meta["top1"]["test"] == pytest.approx(top1, abs=1e-6) and set(meta["top1"]) == {"val", "test"}
        assert meta["l2"] in (1e-4, 1e-3, 1e-2)


def test_a_large_set_takes_larger_batches_not_more_steps():
    """Every step moves every class's weights, so the steps stay near min_steps (batches up to PROBE_MAX_BATCH):
    here 12,000 images x 10 passes in batches of 240, 500 steps, and still the full-batch fit."""
    x, y = overlapping_classes(12_000, seed=1)
    train = CountingRows(x.numpy())
    weight, bias, l2 = fit_linear_probe(train, y, 4, groups=GROUPS, batch_size=64)
    assert max(train.reads) == 240 and sum(r for r in train.reads if r == 240) == 10 * len(x)
    reference = full_batch_fit(x, y, l2, GROUPS)
    assert objective(x, y, weight, bias, l2, GROUPS) <= objective(x, y, *reference, l2, GROUPS) + 2e-3
