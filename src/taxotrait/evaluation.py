"""Evaluation of the explanations, as workflow steps: faithfulness against CAM baselines (the Prompt-CAM paper's
Table 1) and localization against ground truth.

Methods (the registry `taxotrait.methods.METHODS`):

- ``prompt_cam_traits``: Prompt-CAM, the class prompt's last-block attention averaged over the class's trait heads;
- ``prompt_cam_all``: the same averaged over every head;
- ``grad_cam``, ``layer_cam``, ``eigen_cam`` (pytorch-grad-cam) and ``rollout`` (attention rollout): the baselines,
  on a linear probe trained on the same frozen backbone (`taxotrait.baselines`).

Which class a map explains: localization scores the true class's map; faithfulness the predicted class's (its
model's prediction: Prompt-CAM's for Prompt-CAM, the probe's for the baselines), whose probability it follows. For
a correctly classified image the two are the same. Prompt-CAM's trait heads of an image are those greedy head masking
found for it (heads.parquet) when it is correctly classified; otherwise (a misclassified image, or the predicted
class of one) the class's own trait heads: those that are trait heads on at least half of its correctly classified
images, or its most frequent one (all heads for a class without any). Eigen-CAM and rollout are class-agnostic.

Steps (functions of (inputs, outputs, config), called by workflow/scripts):

- `train_probes`: one linear probe per rank on the cached frozen tokens -> ``<rank>/probe.pt``;
- `saliency_maps`: every method's maps on a subset of the attention split, stratified over species (the same
  images at every rank) -> ``<rank>/saliency.h5``;
- `faithfulness_step`: insertion and deletion (`taxotrait.faithfulness`) -> ``<rank>/faithfulness.parquet`` and
  ``<rank>/faithfulness_curves.parquet``;
- `localization_step`: pointing game, energy-based pointing game and part consistency (`taxotrait.localization`)
  -> ``<rank>/localization.parquet``, ``<rank>/head_parts.parquet``;
- `evaluation_summary`: the dataset's ``faithfulness.parquet``, ``localization.parquet``, figures and
  ``evaluation.md``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .attention_store import AttentionFile
from .backbone import weights_digest
from .baselines import LinearProbe, fit_linear_probe, load_probe, save_probe
from .data import AugmentConfig, ImageTransform, load_image
from .dataset import class_names, class_parents, labels
from .devices import autocast, mixed_precision, resolve_device, resolve_precision
from .extract import map_statistics
from .faithfulness import endpoint_probabilities, insertion_deletion, upsample
from .intervals import bootstrap_interval, clears, interval_columns, mean_with_intervals
from .groundtruth import KEYPOINTS, crop_mask, exclusive_masks, load_ground_truth, near_mask
from .localization import energy_shares, normalise_maps, part_consistency, pointing_hits, top_trait_heads
from .methods import METHODS, MODEL_LABELS, MapInputs, cam_rivals, method_label
from .model import PromptCAM, class_rivals, rival_prediction, sibling_groups
from .report import ALL_RANKS, EVALUATION_SETTINGS, page_html
from .report import labels as report_labels
from .saliency_store import read_saliency, write_saliency
from .config import SYNTHETIC_BRANCHING
from .io import atomic_write, empty_table, write_parquet
from .synthetic import RANKS as SYNTHETIC_RANKS
from .synthetic import TRAIT_NAMES
from .token_cache import TokenCache
from .traits import rank_traits

log = logging.getLogger("taxotrait.evaluation")

# The paper's Table 1 (CUB, DINO ViT-B/16): insertion, deletion.
PAPER_TABLE_1 = {"grad_cam": (0.52, 0.17), "layer_cam": (0.54, 0.13), "eigen_cam": (0.56, 0.22),
                 "rollout": (0.55, 0.27), "prompt_cam_traits": (0.61, 0.09)}

FAITHFULNESS_COLUMNS = {"rank": "string", "method": "string", "model": "string",
                        **{c: "float64" for c in interval_columns(["insertion", "deletion"])}, "n_images": "int64",
                        "model_top1": "float64", "pixels_per_step": "int64", "seconds": "float64", "device": "string",
                        "contrast": "string"}
CURVE_COLUMNS = {"rank": "string", "method": "string", "curve": "string", "fraction": "float64",
                 "probability": "float64"}
LOCALIZATION_COLUMNS = {"rank": "string", "method": "string", "part": "string", "metric": "string",
                        "value": "float64", "value_low": "float64", "value_high": "float64", "n_images": "int64",
                        "contrast": "string"}
# metric: (which of `GroundTruth.targets`' (strict, near, area) masks it scores, the per-image score)
LOCALIZATION_GAMES = {"pointing_game": (0, pointing_hits), "pointing_game_tolerance": (1, pointing_hits),
                      "energy_pointing_game": (2, energy_shares)}
COUNTERFACTUAL_COLUMNS = {"rank": "string", "model": "string", "trait": "string",
                          **{c: "float64" for c in interval_columns(["flip_rate", "peak_on_trait", "margin_drop",
                                                                     "probability_drop"])},
                          "n_images": "int64", "n_peak_images": "int64", "original_top1": "float64",
                          "contrast": "string"}
HEAD_PART_COLUMNS = {"rank": "string", "taxon": "string", "head": "int64", "part": "string", "share": "float64",
                     "n_images": "int64", "consistent": "bool", "is_trait_head": "bool"}


# --------------------------------------------------------------------------------------------- settings
def device_of(s: dict) -> torch.device:
    """The device of the evaluation settings `s` (`evaluation.device`)."""
    return resolve_device(s["device"], "evaluation.device")


def faithfulness_ranks(config: dict, finest_ranks: int | None) -> list[str]:
    ranks = config["ranks"]
    return list(ranks) if not finest_ranks else list(ranks[-int(finest_ranks):])


# ------------------------------------------------------------------------------------------------ probes
def rank_groups(config: dict, classes: pd.DataFrame, rank: str) -> torch.Tensor | None:
    """The sibling groups [C] of the classes of `rank` under contrast 'siblings', None under 'rank'."""
    return sibling_groups(class_parents(classes, rank)) if config["contrast"] == "siblings" else None


@torch.no_grad()
def probe_features(probe: LinearProbe, cache: TokenCache, rows: np.ndarray, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Final-norm CLS features [n, views, D] of cache rows `rows` (every view)."""
    chunks = []
    for start in range(0, len(rows), batch_size):
        tokens = torch.from_numpy(cache.tokens[rows[start:start + batch_size]].astype(np.float32)).to(device)
        b, v = tokens.shape[:2]
        with mixed_precision(device):
            chunks.append(probe.features(tokens.flatten(0, 1)).float().unflatten(0, (b, v)).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, cache.views, probe.backbone.embed_dim)


def train_probes(inputs: dict, outputs: dict, config: dict) -> None:
    """A linear probe per rank on the final-norm CLS token of the frozen backbone (features computed once from the
    token caches), with the configured contrast: under 'siblings' trained with the sibling softmax Prompt-CAM is
    trained with; the L2 penalty is chosen on the val split; top-1 on val and test (among the true class's rivals:
    the same decision as Prompt-CAM's) is kept in the probe's file."""
    from .steps.common import backbone_of, new_model

    s = config["evaluation"]
    device = device_of(s)
    manifest, classes = pd.read_parquet(inputs["manifest"]), pd.read_parquet(inputs["classes"])
    first_block = new_model(config, ["probe"]).first_prompted_block
    probe = LinearProbe(backbone_of(config), ["probe"], first_block).to(device)
    train_cache, eval_cache = TokenCache.open(inputs["train_tokens"]), TokenCache.open(inputs["eval_tokens"])
    train_rows = manifest[manifest["split"] == "train"]
    started = time.time()
    train_x = probe_features(probe, train_cache, train_cache.index(train_rows["path"]), s["batch_size"], device)
    split_x = {}
    for split in ("val", "test"):
        rows = manifest[manifest["split"] == split]
        if len(rows):
            split_x[split] = (rows, probe_features(probe, eval_cache, eval_cache.index(rows["path"]), s["batch_size"],
                                                   device)[:, 0])
    log.info("probe features of %d training and %d evaluation images in %.1f s", len(train_x),
             sum(len(x) for _, x in split_x.values()), time.time() - started)
    views, digest = train_x.shape[1], weights_digest(probe.backbone)
    for rank, out in zip(config["ranks"], outputs["probes"]):
        names = class_names(classes, rank)
        groups = rank_groups(config, classes, rank)
        y = torch.as_tensor(labels(train_rows, classes, rank).to_numpy())
        val = split_x.get("val")
        val_y = torch.as_tensor(labels(val[0], classes, rank).to_numpy()) if val else None
        weight, bias, l2 = fit_linear_probe(train_x.flatten(0, 1), y.repeat_interleave(views), len(names),
                                            val[1] if val else None, val_y, groups=groups)
        top1 = {}
        for split, (rows, x) in split_x.items():
            truth = torch.as_tensor(labels(rows, classes, rank).to_numpy())
            prediction = rival_prediction(x @ weight.T + bias, truth, groups)
            top1[split] = float((prediction == truth).double().mean())
        rank_probe = LinearProbe(probe.backbone, names, first_block)
        with torch.no_grad():
            rank_probe.head.weight.copy_(weight)
            rank_probe.head.bias.copy_(bias)
        save_probe(rank_probe, out, config["backbone"]["name"], digest, rank=rank, l2=l2, top1=top1,
                   device=str(device), contrast=config["contrast"])
        log.info("%s probe: l2 %g, top-1 %s", rank, l2, {k: round(v, 3) for k, v in top1.items()})


# -------------------------------------------------------------------------------------------- saliency
def model_groups(model: PromptCAM) -> torch.Tensor | None:
    """The model's sibling groups [C] under contrast 'siblings', None under 'rank' (every class a rival)."""
    return model.groups.cpu() if model.contrast == "siblings" else None


def stratified_order(groups) -> np.ndarray:
    """Indices of `groups` in round-robin order over the groups (first image of every group in order of first
    appearance, then every second image, ...): any prefix is a subset stratified over the groups."""
    groups = pd.Series(list(groups))
    occurrence = groups.groupby(groups, sort=False).cumcount().to_numpy()
    first = pd.Series(pd.factorize(groups)[0]).to_numpy()
    return np.lexsort((first, occurrence))


def own_prompt_heads(path) -> pd.DataFrame:
    """The rows of heads.parquet at `path` of each image's own class prompt: Prompt-CAM's maps are that prompt's
    (under contrast 'siblings' a sibling's prompt may also hold trait heads; those are not its maps)."""
    heads = pd.read_parquet(path)
    return heads[heads["prompt"] == heads["taxon"]].reset_index(drop=True)


def class_trait_heads(heads: pd.DataFrame, names: list[str], num_heads: int, min_frequency: float = 0.5) -> np.ndarray:
    """bool [C, heads]: each class's trait heads (trait heads on >= `min_frequency` of its correctly classified
    images, else its most frequent one; every head for a class without any)."""
    table = np.ones((len(names), num_heads), dtype=bool)
    if heads.empty:
        return table
    traits = rank_traits(heads)
    for index, name in enumerate(names):
        rows = traits[traits["taxon"] == name]
        if rows.empty:
            continue
        chosen = rows.loc[rows["frequency"] >= min_frequency - 1e-12, "head"].tolist() or [int(rows.iloc[0]["head"])]
        table[index] = np.isin(np.arange(num_heads), chosen)
    return table


def trait_head_masks(image_ids, label, prediction, heads: pd.DataFrame, names: list[str], num_heads: int):
    """bool [n, heads] for the true and the predicted class of each image: the image's own trait heads
    (heads.parquet) when it is correctly classified, else the class's (`class_trait_heads`)."""
    by_class = class_trait_heads(heads, names, num_heads)
    own = {}
    for image_id, rows in heads[heads["is_trait_head"]].groupby("image_id"):
        own[image_id] = np.isin(np.arange(num_heads), rows["head"].to_numpy())
    true_heads, predicted_heads = by_class[label].copy(), by_class[prediction].copy()
    for row, image_id in enumerate(image_ids):
        if label[row] == prediction[row] and image_id in own:
            true_heads[row] = predicted_heads[row] = own[image_id]
    return true_heads, predicted_heads


def eval_transform(config: dict) -> ImageTransform:
    """The transform of the eval token cache: PIL image -> normalised eval crop [3, S, S]."""
    from .backbone import data_normalisation
    from .steps.common import backbone_of

    return ImageTransform(config["backbone"]["img_size"], data_normalisation(backbone_of(config)),
                          AugmentConfig(config["augment"]["resize"], False, False))


def load_eval_images(paths, config: dict, device: torch.device) -> torch.Tensor:
    """Normalised eval crops [n, 3, S, S] (the transform of the eval token cache)."""
    transform = eval_transform(config)
    return torch.stack([transform(load_image(p)) for p in paths]).to(device)


def saliency_maps(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    """<rank>/saliency.h5: every method's maps of the true and the predicted class on the evaluation subset.

    Datasets: image_id [n] (stratified order: any prefix is stratified), label, prediction (Prompt-CAM's),
    probe_prediction [n] int64, maps [n, methods, 2, h, w] float32 (slot 0: true class, 1: predicted class).
    Attributes: rank, methods, grid, img_size, prompt_cam_top1, probe_top1 (top-1 on the whole attention split),
    device (where the maps were made).
    """
    from .steps.common import trained_model

    s = config["evaluation"]
    device = device_of(s)
    started = time.time()
    model = trained_model(inputs["model"], config, device)
    probe, meta = load_probe(inputs["probe"], model.backbone, model.backbone_digest)
    probe = probe.to(device)
    manifest = pd.read_parquet(inputs["manifest"]).set_index("image_id", drop=False)
    with AttentionFile(inputs["attention"]) as stored:
        ids, label, prediction = stored.image_ids, stored.labels, stored.predictions
        names, grid, num_heads = stored.class_names, stored.grid, stored.heads
        order = stratified_order(manifest.loc[ids, config["ranks"][-1]])
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
                               lambda: (load_eval_images(paths[i:i + s["batch_size"]], config, device)
                                        for i in range(0, len(paths), s["batch_size"])))
    maps = np.stack([entry.maps(inputs_of_maps) for entry in METHODS.values()], axis=1).astype(np.float32)

    write_saliency(outputs["saliency"], sub_ids, sub_label, sub_prediction, probe_prediction, maps,
                   {"rank": rank, "methods": list(METHODS), "grid": grid, "img_size": config["backbone"]["img_size"],
                    "class_names": names, "prompt_cam_top1": prompt_cam_top1,
                    "probe_top1": float(meta["top1"].get(config["attention"]["split"], np.nan)),
                    "slots": "true class, predicted class", "device": str(device), "contrast": model.contrast})
    log.info("%s: maps of %d methods on %d images in %.1f s (probe top-1 on the subset %.3f)", rank, len(METHODS),
             len(order), time.time() - started, float((probe_prediction == sub_label).mean()))


# -------------------------------------------------------------------------------------------- faithfulness
def faithfulness_step(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    """<rank>/faithfulness.parquet (one row per method: mean insertion and deletion AUC over the images) and
    <rank>/faithfulness_curves.parquet (the mean curves). Ranks outside `finest_ranks` get empty tables."""
    from .steps.common import trained_model

    s = config["evaluation"]
    device = device_of(s)
    f = s["faithfulness"]
    if rank not in faithfulness_ranks(config, f["finest_ranks"]):
        log.info("%s: faithfulness not computed (evaluation.faithfulness.finest_ranks: %s)", rank, f["finest_ranks"])
        write_parquet(empty_table(FAITHFULNESS_COLUMNS), outputs["table"])
        write_parquet(empty_table(CURVE_COLUMNS), outputs["curves"])
        return
    sal = read_saliency(inputs["saliency"])
    n = len(sal["image_id"]) if not f["images"] else min(int(f["images"]), len(sal["image_id"]))
    model = trained_model(inputs["model"], config, device)
    probe, _ = load_probe(inputs["probe"], model.backbone, model.backbone_digest)
    probe = probe.to(device)
    manifest = pd.read_parquet(inputs["manifest"]).set_index("image_id", drop=False)
    images = load_eval_images(manifest.loc[sal["image_id"][:n], "path"], config, device)
    pixels_per_step = int(f["pixels_per_step"] or config["backbone"]["img_size"])
    chunk = config["model"]["class_chunk"]
    dtype = resolve_precision(config["backbone"]["precision"], device)  # every perturbed image: a frozen forward

    def prompt_cam(x):
        with autocast(device, dtype):
            return model(x, chunk_size=chunk)

    def linear_probe(x):
        with autocast(device, dtype):
            return probe(x)

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


# -------------------------------------------------------------------------------------------- localization
def localization_rows(rank: str, maps: np.ndarray, methods: list[str], image_ids, truth: dict, img_size: int,
                      tolerance: float) -> list[tuple]:
    """Rows (`LOCALIZATION_COLUMNS`) of the pointing games and the energy-based pointing game of maps
    [n, methods, h, w] on every ground-truth target (`GroundTruth.targets`), each with its bootstrap interval over
    images, plus the random baseline (a uniformly random point / a uniform map: the target's area share)."""
    have = [i for i, image_id in enumerate(image_ids) if str(image_id) in truth]
    if not have:
        return []
    targets = [truth[str(image_ids[i])].targets(img_size, tolerance, maps.shape[-2:]) for i in have]
    names = list(dict.fromkeys(name for t in targets for name in t))
    records = []  # (method, part, metric, image, value)
    for column, method in enumerate(methods):
        upsampled = upsample(torch.from_numpy(normalise_maps(maps[have, column])), (img_size, img_size)).numpy()
        for name in names:
            pick = [j for j, t in enumerate(targets) if name in t and t[name][2].any()]
            for metric, (k, score) in LOCALIZATION_GAMES.items():
                values = score(upsampled[pick], np.stack([targets[j][name][k] for j in pick])) if pick else []
                records += [(method, name, metric, j, v) for j, v in zip(pick, values)]
    for name in names:
        for metric, (k, _) in LOCALIZATION_GAMES.items():
            records += [("random", name, metric, j, float(t[name][k].mean()))
                        for j, t in enumerate(targets) if name in t and t[name][2].any()]
    table = mean_with_intervals(pd.DataFrame(records, columns=["method", "part", "metric", "image", "value"]),
                                ["method", "part", "metric"], {"value": "value"})
    return [(rank, *row) for row in table.itertuples(index=False)]


def head_part_table(rank: str, attention_path, heads: pd.DataFrame, truth: dict, img_size: int,
                    threshold: float) -> pd.DataFrame:
    """Per (taxon, head) of Prompt-CAM: the part its attention peak hits on most of the taxon's images of the
    attention split (true-class maps), that share, and whether it is consistent (`part_consistency`)."""
    records = []
    with AttentionFile(attention_path) as attention:
        names, num_heads, label = attention.class_names, attention.heads, attention.labels
        for row, image_id in enumerate(attention.image_ids):
            gt = truth.get(str(image_id))
            if gt is None:
                continue
            peak_x, peak_y, _ = map_statistics(attention.maps(row)[0])
            for head in range(num_heads):
                records.append((names[label[row]], head, image_id, gt.part_at(peak_x[head] * img_size,
                                                                             peak_y[head] * img_size)))
    if not records:
        return empty_table(HEAD_PART_COLUMNS)
    table = part_consistency(pd.DataFrame(records, columns=["taxon", "head", "image_id", "part"]), threshold)
    trait = class_trait_heads(heads, names, num_heads)
    index = {name: i for i, name in enumerate(names)}
    table["is_trait_head"] = [bool(trait[index[t], h]) for t, h in zip(table["taxon"], table["head"])]
    table.insert(0, "rank", rank)
    return table[list(HEAD_PART_COLUMNS)].astype(HEAD_PART_COLUMNS)


def localization_step(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    """<rank>/localization.parquet and <rank>/head_parts.parquet (empty without ground truth)."""
    s = config["evaluation"]
    loc = s["localization"]
    img_size = config["backbone"]["img_size"]
    tolerance = float(loc["tolerance"]) * img_size / 224
    manifest = pd.read_parquet(inputs["manifest"])
    split = manifest[manifest["split"] == config["attention"]["split"]]
    truth = load_ground_truth(split, config["augment"]["resize"], img_size, s["parts"])
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


# ------------------------------------------------------------------------------------------- counterfactual
@torch.no_grad()
def _decision(model_scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None):
    """For the true classes `labels` [B]: (the prediction among their rivals [B], their margin [B]: s[c] minus the
    log-sum-exp of the other rivals' scores, the decision's log-odds (s[c] for a class without rivals), and their
    probability among the rivals [B])."""
    rivals = class_rivals(groups, labels, model_scores.shape[1])
    own = model_scores.gather(1, labels[:, None])[:, 0]
    others = rivals.clone()
    others[torch.arange(len(labels)), labels] = False
    margin = own - model_scores.masked_fill(~others, float("-inf")).logsumexp(1)
    probability = model_scores.masked_fill(~rivals, float("-inf")).softmax(1).gather(1, labels[:, None])[:, 0]
    return rival_prediction(model_scores, labels, groups), torch.where(others.any(1), margin, own), probability


def counterfactual_step(rank: str, inputs: dict, outputs: dict, config: dict) -> None:
    """<rank>/counterfactual.parquet: each evaluated image of the demo rendered again with the rank's trait swapped for
    the next sibling's (`taxotrait.synthetic.counterfactual_fish`), scored by Prompt-CAM and the linear probe; one row
    per model (`COUNTERFACTUAL_COLUMNS`). Empty for a dataset that is not the demo (no generator to render with)."""
    from .synthetic import build_taxonomy, counterfactual_fish, swapped_sibling
    from .steps.common import trained_model

    synthetic = config["data"]["synthetic"]
    if not synthetic:
        log.info("%s: no counterfactual images (only the demo's generator can render them)", rank)
        write_parquet(empty_table(COUNTERFACTUAL_COLUMNS), outputs["counterfactual"])
        return
    s = config["evaluation"]
    device = device_of(s)
    started = time.time()
    sal = read_saliency(inputs["saliency"])
    model = trained_model(inputs["model"], config, device)
    probe, _ = load_probe(inputs["probe"], model.backbone, model.backbone_digest)
    probe = probe.to(device)
    names, groups = model.class_names, model_groups(model)
    taxonomy = {sp.species: sp for sp in build_taxonomy(
        synthetic["n_orders"], synthetic["families_per_order"], synthetic["genera_per_family"],
        synthetic["species_per_genus"])}
    siblings = synthetic[dict(SYNTHETIC_BRANCHING)[rank]]
    by_indices = {tuple(getattr(sp, f"{r}_idx") for r in SYNTHETIC_RANKS): sp for sp in taxonomy.values()}
    manifest = pd.read_parquet(inputs["manifest"]).set_index("image_id", drop=False)
    rows = manifest.loc[sal["image_id"]]
    img_size, resize = config["backbone"]["img_size"], config["augment"]["resize"]
    transform = eval_transform(config)
    images, trait_masks, sibling_class = [], [], []
    for image_id, species in zip(rows["image_id"], rows[config["ranks"][-1]]):
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
        prediction, margin, probability = _decision(before, truth, groups)
        cf_prediction, cf_margin, cf_probability = _decision(after, truth, groups)
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


# ------------------------------------------------------------------------------------------------ summary
def with_interval(value: float, low: float, high: float, best: bool = False) -> str:
    """A score and its 95 % interval as a table cell, in bold when `best`."""
    cell = f"{value:.2f} [{low:.2f}, {high:.2f}]" if np.isfinite(low) else f"{value:.2f}"
    return f"**{cell}**" if best else cell


def clear_best(table: pd.DataFrame, column: str, higher_is_better: bool = True) -> str | None:
    """The index of `table`'s best row on `column` when its interval (`column`_low, _high) clears the runner-up's,
    else None (no method is shown best)."""
    ranked = table.sort_values(column, ascending=not higher_is_better)
    if len(ranked) < 2:
        return None
    best, runner_up = ((r[f"{column}_low"], r[f"{column}_high"]) for _, r in ranked.iloc[:2].iterrows())
    return ranked.index[0] if clears(best, runner_up, higher_is_better) else None


def verdicts(faithfulness: pd.DataFrame, localization: pd.DataFrame, rank: str) -> list[str]:
    """Prompt-CAM (trait heads) against the best baseline at `rank`, on the pointing game within the tolerance of the
    rank's own ground-truth target (a mask named like the rank, else the keypoints) and on deletion: ahead with
    intervals that clear (a win), ahead within the intervals (no clear difference), or behind (MISSED, by how much)."""
    lines = []
    ours = "prompt_cam_traits"
    loc = localization[(localization["rank"] == rank) & (localization["metric"] == "pointing_game_tolerance")]
    part = rank if (loc["part"] == rank).any() else (KEYPOINTS if (loc["part"] == KEYPOINTS).any() else None)
    comparisons = []
    if part is not None:
        comparisons.append((f"pointing game within the tolerance of the {part} target",
                            loc[loc["part"] == part].set_index("method"), "value", True))
    fa = faithfulness[faithfulness["rank"] == rank].set_index("method")
    comparisons.append(("deletion (lower is better)", fa, "deletion", False))
    for title, table, column, higher in comparisons:
        others = table.reindex([n for n, m in METHODS.items() if m.model != "prompt_cam"]).dropna(subset=[column])
        if ours not in table.index or not len(others):
            continue
        baseline = others[column].idxmax() if higher else others[column].idxmin()
        a, b = table.loc[ours], others.loc[baseline]
        gap = (a[column] - b[column]) * (1 if higher else -1)
        bounds = ((a[f"{column}_low"], a[f"{column}_high"]), (b[f"{column}_low"], b[f"{column}_high"]))
        verdict = ("beats every baseline, the intervals clear" if clears(*bounds, higher) else
                   f"ahead by {gap:.3f}, within the intervals: no clear difference" if gap > 0 else
                   f"MISSED: level with {method_label(baseline)}" if gap == 0 else
                   f"MISSED: {method_label(baseline)} is ahead by {-gap:.3f}"
                   + ("" if clears(bounds[1], bounds[0], higher) else ", within the intervals"))
        lines.append(f"- {rank}: {title}: Prompt-CAM {with_interval(a[column], *bounds[0])}, best baseline "
                     f"{method_label(baseline)} {with_interval(b[column], *bounds[1])} — {verdict}")
    return lines


LOCALIZATION_TITLES = {
    "pointing_game": "Pointing game, strict (the map's maximum inside the target; keypoints: in a keypoint's patch)",
    "pointing_game_tolerance": "Pointing game within the tolerance (the maximum within 15 px at 224 px of the target)",
    "energy_pointing_game": "Energy-based pointing game (share of the map's mass inside)"}
CONTRAST_NOTES = {
    "siblings": "contrast siblings: every method explains the decision among the true class's siblings (Prompt-CAM "
                "trained with the sibling softmax; the probe trained with the same loss; Grad-CAM and Layer-CAM of "
                "s[c] minus the siblings' log-sum-exp; deletion and insertion follow the probability among the "
                "siblings)",
    "rank": "contrast rank: every method explains the decision among every class of the rank (the paper's set-up)"}


def summary_markdown(faithfulness: pd.DataFrame, localization: pd.DataFrame, ranks: list[str],
                     counterfactual: pd.DataFrame | None = None) -> str:
    """evaluation.md: the paper's Table 1 (faithfulness), the pointing games, part consistency and counterfactual
    traits, every score with its 95 % bootstrap interval over images; a method is in bold only where its interval
    clears the runner-up's."""
    lines = ["# Evaluation of the explanations", ""]
    contrasts = set(faithfulness["contrast"]) | set(localization["contrast"])
    lines += [f"- {CONTRAST_NOTES.get(c, c)}." for c in sorted(contrasts)]
    lines += ["- [low, high]: 95 % bootstrap interval over images (seeded); **bold**: the best method, only where its "
              "interval clears the runner-up's.", ""]
    if len(faithfulness):
        lines += ["## Faithfulness (the paper's Table 1; insertion: higher is better; deletion: lower is better)", "",
                  "| rank | method | model | top-1 | insertion | deletion | images | px/step | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for rank, table in faithfulness.groupby("rank", sort=False):
            table = table.set_index("method")
            best = {column: clear_best(table, column, column == "insertion") for column in ("insertion", "deletion")}
            for method, r in table.iterrows():
                cells = [with_interval(r[c], r[f"{c}_low"], r[f"{c}_high"], best[c] == method)
                         for c in ("insertion", "deletion")]
                lines.append(f"| {rank} | {method_label(method)} | {r.model} | {r.model_top1:.3f} | "
                             f"{cells[0]} | {cells[1]} | {r.n_images} | {r.pixels_per_step} | {r.seconds:.0f} |")
        lines += ["", "The paper (CUB, DINO ViT-B/16), insertion / deletion: " + ", ".join(
            f"{method_label(m)} {i:.2f} / {d:.2f}" for m, (i, d) in PAPER_TABLE_1.items()) + "."]
    else:
        lines += ["No faithfulness scores (evaluation.faithfulness.finest_ranks)."]
    if len(localization):
        maps = localization[localization["metric"].isin(list(LOCALIZATION_GAMES))]
        parts = list(dict.fromkeys(maps["part"]))
        for metric, title in LOCALIZATION_TITLES.items():
            lines += ["", f"## {title}", "", "| rank | method | " + " | ".join(parts) + " |",
                      "|---" * (len(parts) + 2) + "|"]
            for rank, table in maps[maps["metric"] == metric].groupby("rank", sort=False):
                best = {part: clear_best(rows[rows["method"] != "random"].set_index("method"), "value")
                        for part, rows in table.groupby("part")}
                for method, rows in table.groupby("method", sort=False):
                    cells = rows.set_index("part")
                    lines.append(f"| {rank} | {method_label(method)} | " + " | ".join(
                        with_interval(*cells.loc[p, ["value", "value_low", "value_high"]], best[p] == method)
                        if p in cells.index else "" for p in parts) + " |")
        consistency = localization[localization["metric"].str.endswith("part_consistency")]
        if len(consistency):
            lines += ["", "## Part consistency of Prompt-CAM's heads (share of (class, head) pairs hitting the same "
                      "part on >= the threshold of the class's images; interval over the pairs)", "",
                      "| rank | all heads | trait heads |", "|---|---|---|"]
            for rank, rows in consistency.groupby("rank", sort=False):
                values = rows.set_index("metric")
                lines.append(f"| {rank} | " + " | ".join(
                    with_interval(*values.loc[m, ["value", "value_low", "value_high"]]) if m in values.index else ""
                    for m in ("part_consistency", "trait_part_consistency")) + " |")
    else:
        lines += ["", "No localization scores: the dataset has no ground truth (mask_path, evaluation.parts)."]
    if counterfactual is not None and len(counterfactual):
        lines += ["", "## Counterfactual traits (the rank's trait swapped for a sibling's, nothing else changed)", "",
                  "| rank | trait swapped | model | top-1 before | moves to the sibling | top trait head on the "
                  "swapped trait | true-class margin drop | true-class probability drop | images |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in counterfactual.itertuples(index=False):
            cells = [with_interval(*(getattr(r, f"{c}{end}") for end in ("", "_low", "_high")))
                     if np.isfinite(getattr(r, c)) else "—" for c in ("flip_rate", "peak_on_trait", "margin_drop",
                                                                          "probability_drop")]
            lines.append(f"| {r.rank} | {r.trait} | {MODEL_LABELS.get(r.model, r.model)} | {r.original_top1:.2f} | "
                         + " | ".join(cells) + f" | {r.n_images} |")
        lines += ["", "A model that uses the planted trait moves to the sibling whose trait the image now carries; "
                  "one that uses something else keeps its answer."]
    targets = [line for rank in ranks for line in verdicts(faithfulness, localization, rank)]
    if targets:
        lines += ["", "## Prompt-CAM against the baselines", "", *targets]
    return "\n".join(lines) + "\n"


def faithfulness_figure(table: pd.DataFrame, curves: pd.DataFrame):
    """A table of every rank's scores and the mean insertion/deletion curves of the finest rank evaluated."""
    from .figures import new_figure

    if table.empty:
        raise ValueError("no faithfulness scores to show")
    fig = new_figure(1, 1)
    fig.set_size_inches(10, 4.2 + 0.22 * len(table))
    grid = fig.add_gridspec(2, 2, height_ratios=[0.22 * len(table) + 0.8, 3.2])
    ax = fig.add_subplot(grid[0, :])
    ax.axis("off")
    cells = [[r.rank, method_label(r.method), f"{r.model_top1:.3f}", f"{r.insertion:.3f}",
              f"{r.deletion:.3f}", str(r.n_images)] for r in table.itertuples(index=False)]
    shown = ax.table(cellText=cells, colLabels=["rank", "method", "top-1", "insertion ↑", "deletion ↓", "images"],
                     loc="center", cellLoc="center")
    shown.auto_set_font_size(False)
    shown.set_fontsize(10)
    shown.auto_set_column_width(list(range(6)))
    shown.scale(1, 1.3)
    rank = table["rank"].iloc[-1]
    for column, name in enumerate(("insertion", "deletion")):
        axis = fig.add_subplot(grid[1, column])
        for method, rows in curves[(curves["rank"] == rank) & (curves["curve"] == name)].groupby("method", sort=False):
            axis.plot(rows["fraction"], rows["probability"], label=method_label(method),
                      lw=2.2 if method.startswith("prompt_cam") else 1.2)
        axis.set_xlabel(f"fraction of pixels {'restored' if name == 'insertion' else 'removed'}")
        axis.set_ylabel("probability of the predicted class")
        axis.set_title(f"{name} ({rank})", fontsize=10)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
    axis.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # beside the curves
    return fig


def localization_figure(table: pd.DataFrame):
    """One column per rank: the pointing game (top) and the energy-based pointing game (bottom) of every method on
    every target (grey: the random baseline), with one legend above the panels; sized to fit a screen."""
    from .figures import new_figure

    maps = table[table["metric"].isin(["pointing_game", "energy_pointing_game"])]
    if maps.empty:
        raise ValueError("no pointing-game scores to show (the dataset has no ground truth)")
    ranks, methods = list(dict.fromkeys(maps["rank"])), list(dict.fromkeys(maps["method"]))
    width, height = max(11.0, 2.8 * len(ranks)), 6.6
    fig = new_figure(1, 1)
    fig.set_size_inches(width, height)
    axes = fig.subplots(2, len(ranks), squeeze=False, sharey=True)
    bar = 0.8 / len(methods)
    handles = {}
    for column, rank in enumerate(ranks):
        for row, (metric, title) in enumerate((("pointing_game", "pointing game"),
                                               ("energy_pointing_game", "energy pointing game"))):
            axis = axes[row, column]
            rows = maps[(maps["rank"] == rank) & (maps["metric"] == metric)]
            parts = list(dict.fromkeys(rows["part"]))
            for k, method in enumerate(methods):
                values = rows[rows["method"] == method].set_index("part")["value"].reindex(parts)
                handles[method_label(method)] = axis.bar(
                    np.arange(len(parts)) + (k - (len(methods) - 1) / 2) * bar, values, bar,
                    color="0.75" if method == "random" else f"C{k}")
            axis.set_xticks(np.arange(len(parts)), parts, fontsize=10, rotation=30, ha="right",
                            rotation_mode="anchor")
            axis.tick_params(axis="y", labelsize=10)
            axis.set_ylim(0, 1)
            axis.grid(axis="y", alpha=0.3)
            axis.set_title(f"{rank}: {title}", fontsize=11)
    axes[0, 0].set_ylabel("map maximum inside", fontsize=10)
    axes[1, 0].set_ylabel("share of map mass inside", fontsize=10)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(7, len(handles)), fontsize=10,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    return fig


def examples_figure(saliency_path, manifest: pd.DataFrame, config: dict, n: int = 4):
    """The true-class maps of every method on the first `n` images of the subset (eval crops)."""
    from .figures import eval_crop, new_figure, overlay, show_image

    sal = read_saliency(saliency_path)
    n = min(n, len(sal["image_id"]))
    fig = new_figure(n, len(sal["methods"]) + 1, cell=1.6)
    paths = manifest.set_index("image_id").loc[sal["image_id"][:n], "path"]
    names = [str(c) for c in sal["class_names"]]
    for row, (image_id, path) in enumerate(zip(sal["image_id"][:n], paths)):
        image = eval_crop(path, config["backbone"]["img_size"], config["augment"]["resize"])
        ax = fig.add_subplot(n, len(sal["methods"]) + 1, row * (len(sal["methods"]) + 1) + 1)
        show_image(ax, image, names[sal["label"][row]], fontsize=10)
        for column, method in enumerate(sal["methods"]):
            ax = fig.add_subplot(n, len(sal["methods"]) + 1, row * (len(sal["methods"]) + 1) + column + 2)
            title = method_label(method).replace(" (", "\n(") if row == 0 else None
            overlay(ax, image, sal["maps"][row, column, 0], title=title, fontsize=10)
    fig.suptitle(f"{sal['rank']}: maps of the true class", fontsize=12)
    return fig


def evaluation_summary(inputs: dict, outputs: dict, config: dict) -> None:
    """faithfulness.parquet, localization.parquet, counterfactual.parquet (every rank), their figures, the example maps, evaluation.md and its
    HTML page with the evaluation settings (evaluation.html)."""
    from .figures import save_figure

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
                    report_labels=report_labels(ALL_RANKS if ranks == config["ranks"] else ", ".join(ranks),
                                                kind="faithfulness"))
    if localization["metric"].isin(["pointing_game", "energy_pointing_game"]).any():
        save_figure(localization_figure(localization), figures / "localization.png",
                    report_labels=report_labels(kind="localization"))
    else:
        log.info("no ground truth (mask_path, evaluation.parts): no localization figure")
    save_figure(examples_figure(inputs["saliency"][-1], pd.read_parquet(inputs["manifest"]), config),
                figures / "example_maps.png", report_labels=report_labels(config["ranks"][-1], kind="example maps"))
    text = summary_markdown(faithfulness, localization, config["ranks"], counterfactual)
    page = page_html(text, config, EVALUATION_SETTINGS)  # defaults filled in
    for path, content in ((outputs["summary"], text), (outputs["html"], page)):
        with atomic_write(path) as tmp:
            Path(tmp).write_text(content, encoding="utf-8")
    log.info("\n%s", text)
