"""The evaluate step streams: batch by batch, rank by rank, per-class counts only, and the same metrics as scoring every
image at once."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from taxotrait.checkpoint import atomic_save, checkpoint_payload
from taxotrait.evaluation import stratified_order
from taxotrait.model import PromptCAM
from taxotrait.dataset import class_names, class_parents, labels, prepare_files
from taxotrait.schema import with_defaults
from taxotrait.steps import cache, common, evaluate
from taxotrait.train import predict, top_k_accuracy
from test_data import one_thread  # noqa: F401 (autouse fixture: one thread)

REPO = Path(__file__).resolve().parents[1]
RANKS = ["order", "genus", "species"]
# two orders; a genus of three species, a monotypic genus, two genera of two
LINEAGES = {"a": ("A", "A1"), "b": ("A", "A1"), "c": ("A", "A1"), "d": ("A", "A2"),
            "e": ("B", "B1"), "f": ("B", "B1"), "g": ("B", "B2"), "h": ("B", "B2")}
IMAGES = {"train": 1, "val": 2, "test": 3}  # 40 evaluated images
BATCH = 7  # several batches, the last one short


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A prepared image tree of LINEAGES, its eval token cache, a random sibling-contrast model per rank, the settings
    and the inputs of the evaluate step."""
    root = tmp_path_factory.mktemp("evaluate")
    rows = ["order,genus,species"]
    for k, (species, (order, genus)) in enumerate(LINEAGES.items()):
        rows.append(f"{order},{genus},{species}")
        for split, n in IMAGES.items():
            (root / "images" / split / species).mkdir(parents=True)
            for i in range(n):
                pixels = np.random.default_rng(10 * k + i + 100 * len(split)).integers(0, 256, (36, 40, 3))
                Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / split / species / f"{i}.png")
    (root / "taxonomy.csv").write_text("\n".join(rows) + "\n")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(ranks=RANKS, rank_overrides={}, contrast="siblings")
    config["data"] = {"synthetic": None, "images": str(root / "images"), "manifest": None,
                      "taxonomy": str(root / "taxonomy.csv"), "max_reject_fraction": 0.0}
    config["backbone"] = {"name": "vit_tiny_patch16_224", "weights": "random", "img_size": 32, "antialias": False}
    config["augment"] = {"resize": 36, "crop": False, "hflip": False, "views": 1}
    config["train"].update(device="cpu")
    config["model"].update(class_chunk=3)
    with_defaults(config)
    tables = {key: root / f"{key}.parquet" for key in ("manifest", "classes", "rejects")}
    prepare_files({"taxonomy": config["data"]["taxonomy"]}, tables, config["data"], config["ranks"])
    inputs = {"manifest": tables["manifest"], "classes": tables["classes"], "eval_tokens": root / "eval.tokens.npy",
              "models": [root / rank / "model.pt" for rank in RANKS]}
    cache.cache_tokens("eval", tables["manifest"], inputs["eval_tokens"], config)
    classes = pd.read_parquet(tables["classes"])
    for seed, (rank, path) in enumerate(zip(RANKS, inputs["models"])):
        model = common.rank_model(config, classes, rank)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in (model.class_prompts, model.head.weight):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        atomic_save(checkpoint_payload(model, rank=rank), path)
    return inputs, config


def string_top_down(scores: list, parents: list[list[str]], names: list[list[str]]) -> np.ndarray:
    """The former top-down prediction: taxon names compared as strings over [N, C] object arrays."""
    chosen = np.full(len(scores[0]), "", dtype=object)
    for rank_scores, rank_parents, rank_names in zip(scores, parents, names):
        allowed = np.asarray(rank_parents, dtype=object)[None, :] == chosen[:, None]
        predicted = np.where(allowed, np.asarray(rank_scores, dtype=np.float64), -np.inf).argmax(1)
        chosen = np.asarray(rank_names, dtype=object)[predicted]
    return predicted


def dense_metrics(inputs, config, flat_images=None) -> dict[str, pd.DataFrame]:
    """The metrics tables as evaluate made them before it streamed: every image's logits of every rank at once; flat
    top-1/top-5 over the first `flat_images` of each split in round-robin order over species (all when None)."""
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    models = [common.trained_model(path, config) for path in inputs["models"]]
    parents, names = [class_parents(classes, r) for r in RANKS], [class_names(classes, r) for r in RANKS]
    rows = {rank: [] for rank in RANKS}
    for split in ("val", "test"):
        split_rows = manifest[manifest["split"] == split]
        flat = torch.zeros(len(split_rows), dtype=torch.bool)
        flat[stratified_order(split_rows["species"])[:flat_images]] = True
        scores = [predict(m, common.token_data(inputs["eval_tokens"], manifest, classes, r, split)[0],
                          chunk_size=config["model"]["class_chunk"]) for m, r in zip(models, RANKS)]
        for depth, (rank, model, logits) in enumerate(zip(RANKS, models, scores)):
            truth = torch.tensor(labels(split_rows, classes, rank).to_numpy())
            sibling = model.sibling_prediction(logits, truth) == truth
            top_down = torch.as_tensor(string_top_down(scores[: depth + 1], parents[: depth + 1],
                                                       names[: depth + 1])) == truth
            for taxon, pick in [("__all__", torch.ones_like(truth, dtype=torch.bool)),
                                *((name, truth == index) for index, name in enumerate(model.class_names))]:
                if pick.any():
                    sampled = pick & flat
                    top1, top5 = ((top_k_accuracy(logits[sampled], truth[sampled], k) if sampled.any() else np.nan)
                                  for k in (1, 5))
                    rows[rank].append((rank, split, taxon, int(pick.sum()), top1, top5,
                                       sibling[pick].double().mean().item(), top_down[pick].double().mean().item(),
                                       model.contrast, "cpu", int(sampled.sum())))
    return {rank: pd.DataFrame(rows[rank], columns=list(evaluate.METRICS_COLUMNS)).astype(evaluate.METRICS_COLUMNS)
            for rank in RANKS}


def spy_on_scoring(monkeypatch) -> list[tuple[int, int]]:
    """(images, classes) of every scoring the step asks of a model's last block."""
    scored, forward = [], PromptCAM.forward_keys_values

    def spied(model, keys_values, classes=None, chunk_size=None):
        scores = forward(model, keys_values, classes, chunk_size)
        scored.append(tuple(scores.shape))
        return scores

    monkeypatch.setattr(PromptCAM, "forward_keys_values", spied)
    return scored


@pytest.mark.parametrize("flat_images", [None, 5])
def test_streamed_metrics_equal_scoring_every_image_at_once(evaluated, tmp_path, monkeypatch, flat_images):
    """Every column as the dense computation gives it; with a flat sample of 5 images per split, flat top-1/top-5 are
    those of the 5 first images in round-robin order over species (NaN for the species with none there)."""
    inputs, config = evaluated
    config = {**config, "metrics": {"flat_images": flat_images}}
    scored = spy_on_scoring(monkeypatch)
    monkeypatch.setattr(evaluate, "BATCH_SIZE", BATCH)
    targets = [tmp_path / rank / "metrics.parquet" for rank in RANKS]
    evaluate.evaluate(inputs, {"metrics": targets}, config)

    # never more than a batch of images at once; every class only for the top rank and the flat sample
    sizes = {"val": 2 * len(LINEAGES), "test": 3 * len(LINEAGES)}
    assert max(images for images, _ in scored) == BATCH
    every_class = sum(images for images, classes in scored if classes == len(LINEAGES))  # the species rank's
    assert every_class == sum(min(n, flat_images or n) for n in sizes.values())
    expected = dense_metrics(inputs, config, flat_images)
    for rank, target in zip(RANKS, targets):
        streamed = pd.read_parquet(target)
        pd.testing.assert_frame_equal(streamed, expected[rank], check_exact=True)
        assert len(streamed) == 2 * (1 + {"order": 2, "genus": 4, "species": 8}[rank])  # every taxon has images
    species = pd.read_parquet(targets[-1])
    overall = species[species["taxon"] == "__all__"]
    assert overall["n_flat_images"].tolist() == [min(n, flat_images or n) for n in sizes.values()]
    # random models: the three accuracies differ (the counts are not trivially all right or all wrong)
    values = overall[["top1", "sibling_top1", "top_down_top1"]].to_numpy()
    assert ((values > 0) & (values < 1)).any() and (species["top_down_top1"] != species["sibling_top1"]).any()
    if flat_images:
        assert species["top1"].isna().any() and species["sibling_top1"].notna().all()
