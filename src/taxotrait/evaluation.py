"""Evaluation of the explanations: faithfulness against CAM baselines (the Prompt-CAM paper's
Table 1) and localization against ground truth.

Methods (the registry `taxotrait.methods.METHODS`):

- ``prompt_cam_traits``: Prompt-CAM, the class prompt's last-block attention averaged over the class's trait heads;
- ``prompt_cam_all``: the same averaged over every head;
- ``grad_cam``, ``layer_cam``, ``finer_cam``, ``eigen_cam`` (pytorch-grad-cam; Finer-CAM: Zhang et al., CVPR 2025,
  the class against its most similar classes) and ``rollout`` (attention rollout): the baselines, on a linear probe
  trained on the same frozen backbone (`taxotrait.baselines`).

Which class a map explains: localization scores the true class's map; faithfulness the predicted class's (its
model's prediction: Prompt-CAM's for Prompt-CAM, the probe's for the baselines), whose probability it follows. For
a correctly classified image the two are the same. Prompt-CAM's trait heads of an image are those greedy head masking
found for it (heads.parquet) when it is correctly classified; otherwise (a misclassified image, or the predicted
class of one) the class's own trait heads: those that are trait heads on at least half of its correctly classified
images, or its most frequent one (all heads for a class without any). Eigen-CAM and rollout are class-agnostic.

The steps that compute them are `taxotrait.steps.evaluation`; this module holds the methods' bookkeeping, the
tables' columns, the markdown and the figures.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from .attention_store import AttentionFile
from .extract import map_statistics
from .faithfulness import upsample
from .intervals import clears, interval_columns, mean_with_intervals
from .groundtruth import KEYPOINTS
from .localization import energy_shares, normalise_maps, part_consistency, pointing_hits
from .methods import METHODS, MODEL_LABELS, method_label
from .model import PromptCAM, class_rivals, rival_prediction
from .saliency_store import read_saliency
from .io import empty_table
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


# -------------------------------------------------------------------------------------------- faithfulness
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


# ------------------------------------------------------------------------------------------- counterfactual
@torch.no_grad()
def rival_decision(model_scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None):
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
                "s[c] minus the siblings' log-sum-exp, Finer-CAM of s[c] minus the nearest siblings' scores "
                "weighted by their softmax; deletion and insertion follow the probability among the "
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


def examples_figure(saliency_path, manifest: pd.DataFrame, img_size: int, resize: int, n: int = 4):
    """The true-class maps of every method on the first `n` images of the subset (eval crops of `img_size` after
    `resize`)."""
    from .figures import eval_crop, new_figure, overlay, show_image

    sal = read_saliency(saliency_path)
    n = min(n, len(sal["image_id"]))
    fig = new_figure(n, len(sal["methods"]) + 1, cell=1.6)
    paths = manifest.set_index("image_id").loc[sal["image_id"][:n], "path"]
    names = [str(c) for c in sal["class_names"]]
    for row, (image_id, path) in enumerate(zip(sal["image_id"][:n], paths)):
        image = eval_crop(path, img_size, resize)
        ax = fig.add_subplot(n, len(sal["methods"]) + 1, row * (len(sal["methods"]) + 1) + 1)
        show_image(ax, image, names[sal["label"][row]], fontsize=10)
        for column, method in enumerate(sal["methods"]):
            ax = fig.add_subplot(n, len(sal["methods"]) + 1, row * (len(sal["methods"]) + 1) + column + 2)
            title = method_label(method).replace(" (", "\n(") if row == 0 else None
            overlay(ax, image, sal["maps"][row, column, 0], title=title, fontsize=10)
    fig.suptitle(f"{sal['rank']}: maps of the true class", fontsize=12)
    return fig

