"""Steps of workflow/rules/evaluation.smk: the evaluation of the explanations (`taxotrait.evaluation` has the methods,
tables, markdown and figures).

- `train_probes`: one linear probe per rank on the cached frozen tokens -> ``<rank>/probe.pt``;
- `saliency_maps`: every method's maps on a subset of the attention split, stratified over species (the same
  images at every rank) -> ``<rank>/saliency.h5``;
- `faithfulness`: insertion and deletion (`taxotrait.faithfulness`) -> ``<rank>/faithfulness.parquet`` and
  ``<rank>/faithfulness_curves.parquet``, and on the demo the counterfactual traits -> ``<rank>/counterfactual.parquet``;
- `localization`: pointing game, energy-based pointing game and part consistency (`taxotrait.localization`)
  -> ``<rank>/localization.parquet``, ``<rank>/head_parts.parquet``;
- `evaluation_summary`: the dataset's ``faithfulness.parquet``, ``localization.parquet``, figures and
  ``evaluation.md``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..attention_store import AttentionFile
from ..backbone import data_normalisation, weights_digest
from ..baselines import LinearProbe, fit_linear_probe, load_probe, probe_feature_file, rival_accuracy, save_probe
from ..config import SYNTHETIC_BRANCHING, faithfulness_ranks
from ..data import AugmentConfig, ImageDataset, ImageTransform, load_image
from ..dataset import class_names, class_parents, labels, read_manifest_table
from ..devices import frozen_forward, mixed_precision, resolve_device, resolve_precision
from ..evaluation import (
    COUNTERFACTUAL_COLUMNS, CURVE_COLUMNS, FAITHFULNESS_COLUMNS, HEAD_PART_COLUMNS, LOCALIZATION_COLUMNS,
    rival_decision, examples_figure, faithfulness_figure, head_part_table, localization_figure, localization_rows,
    model_groups, own_prompt_heads, stratified_order, summary_markdown, trait_head_masks,
)
from ..extract import map_statistics
from ..faithfulness import endpoint_probabilities, insertion_deletion
from ..figures import save_figure
from ..groundtruth import crop_mask, exclusive_masks, ground_truth_columns, load_ground_truth, near_mask
from ..intervals import bootstrap_interval, mean_with_intervals
from ..io import atomic_write, empty_table, write_parquet
from ..localization import top_trait_heads
from ..methods import METHODS, MapInputs, cam_rivals
from ..model import rival_prediction, sibling_groups
from ..report import ALL_RANKS, EVALUATION_SETTINGS, page_html
from ..report import labels as report_labels
from ..saliency_store import read_saliency, write_saliency
from ..synthetic import RANKS as SYNTHETIC_RANKS
from ..synthetic import TRAIT_NAMES
from ..token_cache import TokenCache, TokenDataset
from .common import backbone_of, new_model, trained_model

log = logging.getLogger("taxotrait.evaluation")


def device_of(s: Mapping) -> torch.device:
    """The device of the evaluation settings `s` (`evaluation.device`)."""
    return resolve_device(s["device"], "evaluation.device")


def rank_groups(settings: Mapping, classes: pd.DataFrame, rank: str) -> torch.Tensor | None:
    """The sibling groups [C] of the classes of `rank` under contrast 'siblings', None under 'rank'."""
    return sibling_groups(class_parents(classes, rank)) if settings["contrast"] == "siblings" else None


def train_probes(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """A linear probe per rank on the final-norm CLS token of the frozen backbone, with the configured contrast:
    under 'siblings' trained with the sibling softmax Prompt-CAM is trained with, scoring each image's siblings
    alone; the L2 penalty is chosen on the val split; top-1 on val and test (among the true class's rivals: the same
    decision as Prompt-CAM's) is kept in the probe's file. The features of every cached view are computed once,
    batch by batch, into temporary files beside the first probe, then each rank's probe is trained on them by
    minibatches of `evaluation.batch_size` (`fit_linear_probe`): memory does not grow with the number of images. With
    `cache.train_tokens` false the training images' features come from the images (eval transform, one view)."""
    s = settings["evaluation"]
    device = device_of(s)
    manifest = read_manifest_table(inputs["manifest"], ["path", "split", *settings["ranks"]])
    classes = pd.read_parquet(inputs["classes"])
    first_block = new_model(settings, ["probe"]).first_prompted_block
    probe = LinearProbe(backbone_of(settings), ["probe"], first_block).to(device)
    eval_cache = TokenCache.open(inputs["eval_tokens"])
    train_cache = TokenCache.open(inputs["train_tokens"]) if settings["cache"]["train_tokens"] else None
    splits = {split: manifest[manifest["split"] == split] for split in ("train", "val", "test")}
    splits = {split: rows for split, rows in splits.items() if len(rows)}
    folder = Path(outputs["probes"][0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    digest = weights_digest(probe.backbone)
    with tempfile.TemporaryDirectory(prefix=".probe_features.", dir=folder) as scratch:
        started, features = time.time(), {}
        for split, rows in splits.items():
            cache = train_cache if split == "train" else eval_cache
            if cache is None:  # cache.train_tokens false: the training images' frozen forward runs here
                data = ImageDataset(rows["path"].tolist(), np.zeros(len(rows)), eval_transform(settings))
            else:
                data = TokenDataset(cache, np.zeros(len(rows)), cache.index(rows["path"]), every_view=True)
            per_view = probe_feature_file(probe, data, Path(scratch) / f"{split}.npy", s["batch_size"], device)
            features[split] = per_view.reshape(-1, per_view.shape[-1])  # [images x views, D]
        log.info("probe features of %s images in %.1f s", {split: len(rows) for split, rows in splits.items()},
                 time.time() - started)
        for rank, out in zip(settings["ranks"], outputs["probes"]):
            names, groups = class_names(classes, rank), rank_groups(settings, classes, rank)
            truth = {split: torch.from_numpy(labels(rows, classes, rank).to_numpy(copy=True))
                     for split, rows in splits.items()}
            weight, bias, l2 = fit_linear_probe(
                features["train"], truth["train"].repeat_interleave(len(features["train"]) // len(splits["train"])), len(names),
                features.get("val"), truth.get("val"), groups=groups, batch_size=s["batch_size"], device=device)
            top1 = {split: float(rival_accuracy(features[split], truth[split], weight[None].to(device),
                                                bias[None].to(device), groups, s["batch_size"])[0])
                    for split in ("val", "test") if split in splits}
            rank_probe = LinearProbe(probe.backbone, names, first_block)
            with torch.no_grad():
                rank_probe.head.weight.copy_(weight)
                rank_probe.head.bias.copy_(bias)
            save_probe(rank_probe, out, settings["backbone"]["name"], digest, rank=rank, l2=l2, top1=top1,
                       device=str(device), contrast=settings["contrast"])
            log.info("%s probe: l2 %g, top-1 %s", rank, l2, {k: round(v, 3) for k, v in top1.items()})


def eval_transform(settings: Mapping) -> ImageTransform:
    """The transform of the eval token cache: PIL image -> normalised eval crop [3, S, S]."""
    return ImageTransform(settings["backbone"]["img_size"], data_normalisation(backbone_of(settings)),
                          AugmentConfig(settings["augment"]["resize"], False, False))


def load_eval_images(paths, settings: Mapping, device: torch.device) -> torch.Tensor:
    """Normalised eval crops [n, 3, S, S] (the transform of the eval token cache)."""
    transform = eval_transform(settings)
    return torch.stack([transform(load_image(p)) for p in paths]).to(device)


def saliency_maps(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """<rank>/saliency.h5 (layout: `taxotrait.saliency_store`): every method's maps of the true and the predicted class
    on the evaluation subset (`evaluation.images` images of `attention.split`, stratified over species)."""
    s = settings["evaluation"]
    device = device_of(s)
    started = time.time()
    model = trained_model(inputs["model"], settings, device)
    probe, meta = load_probe(inputs["probe"], model.backbone, model.backbone_digest)
    probe = probe.to(device)
    manifest = read_manifest_table(inputs["manifest"], ["image_id", "path", settings["ranks"][-1]],
                                   [settings["attention"]["split"]]).set_index("image_id", drop=False)
    with AttentionFile(inputs["attention"]) as stored:
        ids, label, prediction = stored.image_ids, stored.labels, stored.predictions
        names, grid, num_heads = stored.class_names, stored.grid, stored.heads
        order = stratified_order(manifest.loc[ids, settings["ranks"][-1]])
        if s["images"]:
            order = order[: s["images"]]
        attention = np.stack([stored.maps(row)[:2] for row in order])  # [n, 2, H, h, w]
    prompt_cam_top1 = float((label == prediction).mean())
    sub_ids, sub_label, sub_prediction = ids[order], label[order], prediction[order]
    rows = manifest.loc[sub_ids]
    true_heads, predicted_heads = trait_head_masks(sub_ids, sub_label, sub_prediction,
                                                   own_prompt_heads(inputs["heads"]), names, num_heads)
    cache = TokenCache.open(inputs["eval_tokens"])
    tokens = torch.from_numpy(cache.tokens[cache.index(rows["path"]), 0].astype(np.float32)).to(device)
    if probe.class_names != names:
        raise ValueError(f"{inputs['probe']}: its classes are not those of {inputs['attention']}")
    groups = model_groups(model)
    truth = torch.as_tensor(sub_label)
    with torch.no_grad(), mixed_precision(device):
        probe_scores = torch.cat([probe.forward_tokens(tokens[i:i + s["batch_size"]]).float().cpu()
                                  for i in range(0, len(tokens), s["batch_size"])])
    probe_prediction = rival_prediction(probe_scores, truth, groups).numpy()
    paths = rows["path"].tolist()
    inputs_of_maps = MapInputs(attention, true_heads, predicted_heads, probe, tokens, truth, probe_prediction, groups,
                               names, s["batch_size"],
                               lambda: (load_eval_images(paths[i:i + s["batch_size"]], settings, device)
                                        for i in range(0, len(paths), s["batch_size"])))
    maps = np.stack([entry.maps(inputs_of_maps) for entry in METHODS.values()], axis=1).astype(np.float32)

    write_saliency(outputs["saliency"], sub_ids, sub_label, sub_prediction, probe_prediction, maps,
                   {"rank": rank, "methods": list(METHODS), "grid": grid, "img_size": settings["backbone"]["img_size"],
                    "class_names": names, "prompt_cam_top1": prompt_cam_top1,
                    "probe_top1": float(meta["top1"].get(settings["attention"]["split"], np.nan)),
                    "slots": "true class, predicted class", "device": str(device), "contrast": model.contrast})
    log.info("%s: maps of %d methods on %d images in %.1f s (probe top-1 on the subset %.3f)", rank, len(METHODS),
             len(order), time.time() - started, float((probe_prediction == sub_label).mean()))


def insertion_deletion_tables(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """<rank>/faithfulness.parquet (one row per method: mean insertion and deletion AUC over the images) and
    <rank>/faithfulness_curves.parquet (the mean curves). Ranks outside `finest_ranks` get empty tables."""
    s = settings["evaluation"]
    device = device_of(s)
    f = s["faithfulness"]
    if rank not in faithfulness_ranks(settings["ranks"], f["finest_ranks"]):
        log.info("%s: faithfulness not computed (evaluation.faithfulness.finest_ranks: %s)", rank, f["finest_ranks"])
        write_parquet(empty_table(FAITHFULNESS_COLUMNS), outputs["table"])
        write_parquet(empty_table(CURVE_COLUMNS), outputs["curves"])
        return
    sal = read_saliency(inputs["saliency"])
    n = len(sal["image_id"]) if not f["images"] else min(int(f["images"]), len(sal["image_id"]))
    model = trained_model(inputs["model"], settings, device)
    probe, _ = load_probe(inputs["probe"], model.backbone, model.backbone_digest)
    probe = probe.to(device)
    manifest = read_manifest_table(inputs["manifest"], ["image_id", "path"]).set_index("image_id", drop=False)
    images = load_eval_images(manifest.loc[sal["image_id"][:n], "path"], settings, device)
    pixels_per_step = int(f["pixels_per_step"] or settings["backbone"]["img_size"])
    chunk = settings["model"]["class_chunk"]
    dtype = resolve_precision(settings["backbone"]["precision"], device)  # every perturbed image: a frozen forward

    def prompt_cam(x):
        return frozen_forward(lambda piece: model(piece, chunk_size=chunk), x, device, dtype)

    def linear_probe(x):
        return frozen_forward(probe, x, device, dtype)

    groups = model_groups(model)
    decisions = {}  # per model: (predict, targets, rivals, endpoints), the curves' ends computed once
    for name, predict, predicted in (("prompt_cam", prompt_cam, sal["prediction"]),
                                     ("linear_probe", linear_probe, sal["probe_prediction"])):
        targets = torch.as_tensor(predicted[:n])
        rivals = cam_rivals(groups, targets, model.class_names)
        decisions[name] = (predict, targets, rivals, endpoint_probabilities(predict, images, targets, s["batch_size"],
                                                                            rivals=rivals))
    rows, curves = [], []
    for column, method in enumerate(sal["methods"]):
        started = time.time()
        explained = METHODS[method].model
        is_prompt_cam = explained == "prompt_cam"
        predict, targets, rivals, endpoints = decisions[explained]
        result = insertion_deletion(predict, images, torch.from_numpy(sal["maps"][:n, column, 1]), targets,
                                    pixels_per_step, s["batch_size"], rivals=rivals, endpoints=endpoints)
        seconds = time.time() - started
        scores = [(float(auc.mean()), *bootstrap_interval(auc.numpy()))
                  for auc in (result.insertion_auc, result.deletion_auc)]
        rows.append((rank, method, explained, *scores[0], *scores[1], n,
                     float(sal["prompt_cam_top1"] if is_prompt_cam else sal["probe_top1"]), pixels_per_step, seconds,
                     str(device), model.contrast))
        for name, curve in (("insertion", result.insertion), ("deletion", result.deletion)):
            for fraction, probability in zip(result.fractions.tolist(), curve.mean(0).tolist()):
                curves.append((rank, method, name, fraction, probability))
        log.info("%s %s: insertion %.3f [%.3f, %.3f], deletion %.3f [%.3f, %.3f] on %d images (%d steps) in %.1f s",
                 rank, method, *scores[0], *scores[1], n, len(result.fractions) - 1, seconds)
    write_parquet(pd.DataFrame(rows, columns=list(FAITHFULNESS_COLUMNS)).astype(FAITHFULNESS_COLUMNS),
                   outputs["table"])
    write_parquet(pd.DataFrame(curves, columns=list(CURVE_COLUMNS)).astype(CURVE_COLUMNS), outputs["curves"])


def localization(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """<rank>/localization.parquet and <rank>/head_parts.parquet (empty without ground truth)."""
    s = settings["evaluation"]
    loc = s["localization"]
    img_size = settings["backbone"]["img_size"]
    tolerance = float(loc["tolerance"]) * img_size / 224
    manifest_path = inputs["manifest"]
    split = read_manifest_table(manifest_path, ground_truth_columns(manifest_path, s["parts"]),
                                [settings["attention"]["split"]])
    truth = load_ground_truth(split, settings["augment"]["resize"], img_size, s["parts"])
    if not truth:
        log.info("%s: no ground truth (no mask_path column, no evaluation.parts): nothing to localize", rank)
        write_parquet(empty_table(LOCALIZATION_COLUMNS), outputs["table"])
        write_parquet(empty_table(HEAD_PART_COLUMNS), outputs["head_parts"])
        return
    sal = read_saliency(inputs["saliency"])
    rows = localization_rows(rank, sal["maps"][:, :, 0], sal["methods"], sal["image_id"], truth, img_size, tolerance)
    heads = head_part_table(rank, inputs["attention"], own_prompt_heads(inputs["heads"]), truth, img_size,
                            float(loc["consistency"]))
    images = int(heads.groupby("taxon")["n_images"].max().sum()) if len(heads) else 0
    for metric, pairs in (("part_consistency", heads), ("trait_part_consistency", heads[heads["is_trait_head"]])):
        if len(pairs):  # a share of (class, head) pairs: its interval resamples the pairs
            consistent = pairs["consistent"].to_numpy(dtype=np.float64)
            rows.append((rank, "prompt_cam", "", metric, float(consistent.mean()), *bootstrap_interval(consistent),
                         images))
    table = pd.DataFrame(rows, columns=list(LOCALIZATION_COLUMNS)[:-1]).assign(contrast=str(sal["contrast"]))
    table = table.astype(LOCALIZATION_COLUMNS)
    write_parquet(table, outputs["table"])
    write_parquet(heads, outputs["head_parts"])
    log.info("%s localization:\n%s", rank, table.to_string(index=False))


def counterfactual_table(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """<rank>/counterfactual.parquet: each evaluated image of the demo rendered again with the rank's trait swapped for
    the next sibling's (`taxotrait.synthetic.counterfactual_fish`), scored by Prompt-CAM and the linear probe; one row
    per model (`COUNTERFACTUAL_COLUMNS`). Empty for a dataset that is not the demo (no generator to render with)."""
    from ..synthetic import build_taxonomy, counterfactual_fish, swapped_sibling
    synthetic = settings["data"]["synthetic"]
    if not synthetic:
        log.info("%s: no counterfactual images (only the demo's generator can render them)", rank)
        write_parquet(empty_table(COUNTERFACTUAL_COLUMNS), outputs["counterfactual"])
        return
    s = settings["evaluation"]
    device = device_of(s)
    started = time.time()
    sal = read_saliency(inputs["saliency"])
    model = trained_model(inputs["model"], settings, device)
    probe, _ = load_probe(inputs["probe"], model.backbone, model.backbone_digest)
    probe = probe.to(device)
    names, groups = model.class_names, model_groups(model)
    taxonomy = {sp.species: sp for sp in build_taxonomy(
        synthetic["n_orders"], synthetic["families_per_order"], synthetic["genera_per_family"],
        synthetic["species_per_genus"])}
    siblings = synthetic[dict(SYNTHETIC_BRANCHING)[rank]]
    by_indices = {tuple(getattr(sp, f"{r}_idx") for r in SYNTHETIC_RANKS): sp for sp in taxonomy.values()}
    manifest = read_manifest_table(inputs["manifest"], ["image_id", "path", settings["ranks"][-1]])
    rows = manifest.set_index("image_id", drop=False).loc[sal["image_id"]]
    img_size, resize = settings["backbone"]["img_size"], settings["augment"]["resize"]
    transform = eval_transform(settings)
    images, trait_masks, sibling_class = [], [], []
    for image_id, species in zip(rows["image_id"], rows[settings["ranks"][-1]]):
        sp = taxonomy[species]
        swap = swapped_sibling(sp, rank, siblings)
        image, masks, _ = counterfactual_fish(image_id, sp, rank, swap, synthetic["image_size"], synthetic["seed"])
        images.append(transform(Image.fromarray(image)))
        region = exclusive_masks({k: crop_mask(m, resize, img_size) for k, m in masks.items()})[rank]
        trait_masks.append(near_mask(region, float(s["localization"]["tolerance"]) * img_size / 224))
        indices = {r: getattr(sp, f"{r}_idx") for r in SYNTHETIC_RANKS}
        indices[rank] = swap
        sibling_class.append(names.index(getattr(by_indices[tuple(indices.values())], rank)))
    truth = torch.as_tensor(sal["label"])
    cache = TokenCache.open(inputs["eval_tokens"])
    original = torch.from_numpy(cache.tokens[cache.index(rows["path"]), 0].astype(np.float32)).to(device)
    batches = torch.stack(images).to(device).split(s["batch_size"])
    with torch.no_grad(), mixed_precision(device):
        swapped = torch.cat([model.frozen_tokens(batch) for batch in batches])
        scores = {"prompt_cam": [model.forward_tokens(t).float().cpu() for t in (original, swapped)],
                  "linear_probe": [probe.forward_tokens(t).float().cpu() for t in (original, swapped)]}
        attention = model.class_scores(model.last_block_input(swapped), truth[:, None].to(device),
                                       return_attention=True)[1][:, 0].float().cpu().numpy()  # [n, heads, keys]
    peak_x, peak_y, _ = map_statistics(attention[..., -int(np.prod(sal["grid"])):].reshape(
        *attention.shape[:2], *(int(g) for g in sal["grid"])))
    tops = top_trait_heads(own_prompt_heads(inputs["heads"])).set_index("image_id")["head"]
    on_trait = np.full(len(rows), np.nan)
    for i, image_id in enumerate(rows["image_id"]):
        if image_id in tops.index:
            head = int(tops[image_id])
            y, x = (min(int(v * img_size), img_size - 1) for v in (peak_y[i, head], peak_x[i, head]))
            on_trait[i] = float(trait_masks[i][y, x])
    target = torch.as_tensor(sibling_class)
    records = []
    for name, (before, after) in scores.items():
        prediction, margin, probability = rival_decision(before, truth, groups)
        cf_prediction, cf_margin, cf_probability = rival_decision(after, truth, groups)
        records.append(pd.DataFrame({
            "model": name, "image": np.arange(len(rows)), "correct": (prediction == truth).double().numpy(),
            "flip": (cf_prediction == target).double().numpy(),
            "peak": on_trait if name == "prompt_cam" else np.nan,
            "margin_drop": (margin - cf_margin).double().numpy(),
            "probability_drop": (probability - cf_probability).double().numpy()}))
    per_image = pd.concat(records, ignore_index=True)
    table = mean_with_intervals(per_image, ["model"], {"flip_rate": "flip", "margin_drop": "margin_drop",
                                                       "probability_drop": "probability_drop"})
    peaks = mean_with_intervals(per_image.dropna(subset=["peak"]), ["model"], {"peak_on_trait": "peak"})
    table = table.merge(peaks.rename(columns={"n_images": "n_peak_images"}), on="model", how="left")
    table["n_peak_images"] = table["n_peak_images"].fillna(0)
    table = table.merge(per_image.groupby("model")["correct"].mean().rename("original_top1"), on="model")
    table = table.assign(rank=rank, trait=TRAIT_NAMES[rank], contrast=model.contrast)
    table = table[list(COUNTERFACTUAL_COLUMNS)].astype(COUNTERFACTUAL_COLUMNS)
    write_parquet(table, outputs["counterfactual"])
    log.info("%s counterfactual (%s swapped, %d images, %.1f s):\n%s", rank, TRAIT_NAMES[rank], len(rows),
             time.time() - started, table.to_string(index=False))


def evaluation_summary(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """faithfulness.parquet, localization.parquet, counterfactual.parquet (every rank), their figures, the example maps, evaluation.md and its
    HTML page with the evaluation settings (evaluation.html)."""
    faithfulness = pd.concat([pd.read_parquet(p) for p in inputs["faithfulness"]], ignore_index=True)
    faithfulness = faithfulness.astype(FAITHFULNESS_COLUMNS) if len(faithfulness) else empty_table(FAITHFULNESS_COLUMNS)
    curves = pd.concat([pd.read_parquet(p) for p in inputs["curves"]], ignore_index=True)
    localization = pd.concat([pd.read_parquet(p) for p in inputs["localization"]], ignore_index=True)
    localization = localization.astype(LOCALIZATION_COLUMNS) if len(localization) else empty_table(LOCALIZATION_COLUMNS)
    counterfactual = pd.concat([pd.read_parquet(p) for p in inputs["counterfactual"]], ignore_index=True)
    counterfactual = counterfactual.astype(COUNTERFACTUAL_COLUMNS) if len(counterfactual) else empty_table(
        COUNTERFACTUAL_COLUMNS)
    write_parquet(faithfulness, outputs["faithfulness"])
    write_parquet(localization, outputs["localization"])
    write_parquet(counterfactual, outputs["counterfactual"])
    figures = Path(outputs["figures"])
    figures.mkdir(parents=True, exist_ok=True)
    ranks = list(dict.fromkeys(faithfulness["rank"]))
    if ranks:
        save_figure(faithfulness_figure(faithfulness, curves), figures / "faithfulness.png",
                    report_labels=report_labels(ALL_RANKS if ranks == settings["ranks"] else ", ".join(ranks),
                                                kind="faithfulness"))
    if localization["metric"].isin(["pointing_game", "energy_pointing_game"]).any():
        save_figure(localization_figure(localization), figures / "localization.png",
                    report_labels=report_labels(kind="localization"))
    else:
        log.info("no ground truth (mask_path, evaluation.parts): no localization figure")
    manifest = read_manifest_table(inputs["manifest"], ["image_id", "path"], [settings["attention"]["split"]])
    save_figure(examples_figure(inputs["saliency"][-1], manifest, settings["backbone"]["img_size"],
                                settings["augment"]["resize"]),
                figures / "example_maps.png", report_labels=report_labels(settings["ranks"][-1], kind="example maps"))
    text = summary_markdown(faithfulness, localization, settings["ranks"], counterfactual)
    page = page_html(text, settings, EVALUATION_SETTINGS)  # defaults filled in
    for path, content in ((outputs["summary"], text), (outputs["html"], page)):
        with atomic_write(path) as tmp:
            Path(tmp).write_text(content, encoding="utf-8")
    log.info("\n%s", text)


def faithfulness(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """Whether each model uses what its maps show: insertion and deletion of every method
    (`insertion_deletion_tables`) and, on the demo, the counterfactual traits (`counterfactual_table`)."""
    insertion_deletion_tables(rank, inputs, outputs, settings)
    counterfactual_table(rank, inputs, outputs, settings)
