"""Figures of trait heads: attention overlays, per-taxon trait galleries, traits shared with a sibling taxon, and the
coarse-to-fine view of one species across ranks (as in the Prompt-CAM paper's Figure 9).

Images are shown as the model saw them: the eval crop (shorter side resized to ``augment.resize``, centre crop of the
model's image size), un-normalised. Maps come from ``attention.h5`` (read through `taxotrait.attention_store`): the
last-block attention of a class prompt over the patch grid, upsampled bilinearly to the crop and min-max normalised
per map.

The plotting functions take arrays and return `matplotlib.figure.Figure` objects (Agg rendering, no pyplot state),
so they can be used from a notebook; `rank_figures` and `hierarchy_figures` are the workflow steps that read the
result files and write PNGs.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .attention_store import AttentionFile
from .data import AugmentConfig, ImageTransform, load_image
from .faithfulness import upsample
from .report import ALL_RANKS, labels, png_labels
from .io import atomic_write

log = logging.getLogger("taxotrait.figures")

DPI = 100
CELL = 1.9  # inches per image cell
CMAP = "jet"


# ------------------------------------------------------------------------------------------------ helpers
def safe_name(name: str) -> str:
    """A file-name-safe version of `name`: letters, digits and -_. kept, anything else (and a leading dot) -> '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", str(name))
    cleaned = re.sub(r"^\.", "_", cleaned)
    return cleaned or "_"


def unique_name(name: str, used: set[str]) -> str:
    """`name`, or `name_2`, `name_3`... when already in `used` (two taxa may sanitise to the same name)."""
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate)
    return candidate


@dataclass(frozen=True)
class FigureSettings:
    """What the figures show: `resize` (augment.resize, the eval crop's), `gallery_images` images per trait gallery
    and `max_heads` trait heads per taxon (figures.gallery_images, figures.max_heads)."""

    resize: int
    gallery_images: int
    max_heads: int


def eval_crop(path: str | os.PathLike, img_size: int, resize: int) -> np.ndarray:
    """The image at `path` as the model saw it: the eval crop, RGB float [S, S, 3] in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    transform = ImageTransform(img_size, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), AugmentConfig(resize, False, False))
    return transform(load_image(path)).permute(1, 2, 0).clamp(0, 1).numpy()


def normalise_map(heat: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    low, high = float(heat.min()), float(heat.max())
    return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def map_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Histogram intersection of two attention maps (each scaled to sum 1): 1 = same distribution, 0 = disjoint."""
    a, b = np.clip(np.asarray(a, np.float64), 0, None), np.clip(np.asarray(b, np.float64), 0, None)
    if a.sum() <= 0 or b.sum() <= 0:
        return 0.0
    return float(np.minimum(a / a.sum(), b / b.sum()).sum())


def _clean(ax) -> None:
    """No ticks or frame, but keep the axis labels visible (row labels)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def new_figure(rows: int, cols: int, cell: float = CELL, title_space: float = 0.6) -> Figure:
    """An Agg-backed figure sized for a rows x cols grid of image cells."""
    fig = Figure(figsize=(max(cols * cell, 4.0), rows * cell + title_space), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, tight: bool = True, colours: int | None = 256,
                report_labels: dict[str, str] | None = None) -> Path:
    """Write `fig` as a PNG (cropped to its content when `tight`; quantised to a palette of `colours`, about 4x
    smaller and visually the same, unless None), with its `report_labels` (`taxotrait.report.labels`) in text
    chunks. The figure is not registered with pyplot: dropping it frees it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight" if tight else None, facecolor="white",
                pil_kwargs={"compress_level": 0})
    buffer.seek(0)
    with Image.open(buffer) as image:
        image = image.convert("RGB")
        if colours:
            image = image.quantize(colours, method=Image.Quantize.FASTOCTREE)
        with atomic_write(path) as tmp:
            image.save(tmp, format="PNG", optimize=True,
                       pnginfo=png_labels(report_labels) if report_labels else None)
    return path


# ------------------------------------------------------------------------------------------------ plots
def overlay(ax, image: np.ndarray, attention_map: np.ndarray, alpha: float = 0.5, cmap: str = CMAP,
            normalise: bool = True, title: str | None = None, fontsize: float = 8):
    """Draw `image` ([H, W, 3], float in [0, 1] or uint8) with `attention_map` ([h, w]) upsampled bilinearly to it as
    a semi-transparent heat map. Returns the heat map's AxesImage."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255
    heat = upsample(torch.as_tensor(np.asarray(attention_map, dtype=np.float32))[None], image.shape[:2])[0].numpy()
    if normalise:
        heat = normalise_map(heat)
    ax.imshow(image, interpolation="nearest")
    shown = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0 if normalise else None, vmax=1 if normalise else None,
                      interpolation="nearest")
    _clean(ax)
    if title:
        ax.set_title(title, fontsize=fontsize)
    return shown


def show_image(ax, image: np.ndarray, title: str | None = None, fontsize: float = 8) -> None:
    """The plain image, without ticks."""
    ax.imshow(np.asarray(image), interpolation="nearest")
    _clean(ax)
    if title:
        ax.set_title(title, fontsize=fontsize)


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def trait_gallery(taxon: str, traits: pd.DataFrame, images: list[np.ndarray], maps: np.ndarray,
                  image_ids: list[str] | None = None, rank: str | None = None) -> Figure:
    """Gallery of one taxon: first row the plain example images, then one row per trait head (rows of `traits`, in
    order: columns head, frequency, and prompt when the head is a sibling's prompt), each cell that head's attention
    map over the image.

    maps: [n_images, len(traits), h, w], each trait row's map on each image (`AttentionFile.head_maps`).
    """
    traits = traits.reset_index(drop=True)
    n_images, n_heads = len(images), len(traits)
    if n_images == 0 or n_heads == 0:
        raise ValueError(f"{taxon}: a gallery needs at least one image and one trait head")
    fig = new_figure(n_heads + 1, n_images, title_space=0.8)
    axes = fig.subplots(n_heads + 1, n_images, squeeze=False)
    for j, image in enumerate(images):
        show_image(axes[0, j], image, _short(image_ids[j]) if image_ids else None, fontsize=7)
    axes[0, 0].set_ylabel("image", fontsize=9)
    for i, trait in traits.iterrows():
        head = int(trait["head"])
        for j, image in enumerate(images):
            ax = axes[i + 1, j]
            overlay(ax, image, maps[j, i])
            ax.set_gid(f"head:{head}")
        whose = f"\nof {_short(str(trait['prompt']), 18)}" if trait.get("prompt", taxon) != taxon else ""
        axes[i + 1, 0].set_ylabel(f"head {head}{whose}\nfreq {trait['frequency']:.0%}", fontsize=9)
    prefix = f"{rank} " if rank else ""
    fig.suptitle(f"{prefix}{taxon}: top {n_heads} trait head{'s' * (n_heads > 1)} (rows, by frequency)\n"
                 f"on {n_images} correctly classified image{'s' * (n_images > 1)}", fontsize=10)
    fig.tight_layout()
    return fig


@dataclass
class SharedExample:
    """One image of `taxon` and its maps under its own class prompt and under a sibling's, for some trait heads."""

    image: np.ndarray
    taxon: str
    sibling: str
    heads: list[int]
    frequencies: list[float]
    own_maps: np.ndarray  # [heads, h, w] under the prompt of `taxon`
    sibling_maps: np.ndarray  # [heads, h, w] under the prompt of `sibling`
    image_id: str = ""


def shared_traits_figure(examples: list[SharedExample], rank: str | None = None) -> Figure:
    """Each example as two rows: the image under its own class prompt (top) and under a sibling's prompt (bottom),
    one column per trait head of its own taxon, with the overlap of the two maps (1 = the sibling attends to the same
    place: a trait the two share)."""
    if not examples:
        raise ValueError("no examples")
    cols = 1 + max(len(e.heads) for e in examples)
    fig = new_figure(2 * len(examples), cols, title_space=0.8)
    axes = fig.subplots(2 * len(examples), cols, squeeze=False)
    for k, example in enumerate(examples):
        top, bottom = axes[2 * k], axes[2 * k + 1]
        show_image(top[0], example.image, f"{_short(example.taxon, 20)}\n{_short(example.image_id, 24)}", fontsize=7)
        bottom[0].axis("off")
        bottom[0].text(0.5, 0.5, f"own prompt:\n{_short(example.taxon, 20)}\n\nsibling prompt:\n"
                       f"{_short(example.sibling, 20)}", ha="center", va="center", fontsize=8,
                       transform=bottom[0].transAxes)
        for c, (head, frequency) in enumerate(zip(example.heads, example.frequencies), start=1):
            own, other = example.own_maps[c - 1], example.sibling_maps[c - 1]
            overlay(top[c], example.image, own, title=f"head {head} · freq {frequency:.0%}")
            overlay(bottom[c], example.image, other, title=f"head {head} · overlap {map_overlap(own, other):.2f}")
            top[c].set_gid(f"own:{head}")
            bottom[c].set_gid(f"sibling:{head}")
        top[1].set_ylabel(f"prompt {_short(example.taxon, 16)}", fontsize=8)
        bottom[1].set_ylabel(f"prompt {_short(example.sibling, 16)}", fontsize=8)
        for c in range(1 + len(example.heads), cols):
            top[c].axis("off")
            bottom[c].axis("off")
    prefix = f"{rank}: " if rank else ""
    fig.suptitle(f"{prefix}traits shared with a sibling taxon: each image under its own class prompt (upper row) "
                 f"and a sibling's (lower row)\nfor its taxon's top trait heads; high overlap = a trait the two share",
                 fontsize=10)
    fig.tight_layout()
    return fig


@dataclass
class HierarchyColumn:
    """The trait heads of one rank for a species' image: the ancestor `taxon` at `rank`, its heads and their maps."""

    rank: str
    taxon: str
    heads: list[int] = field(default_factory=list)
    frequencies: list[float] = field(default_factory=list)
    maps: np.ndarray | None = None  # [len(heads), h, w], true-class maps of the rank's model
    correct: bool = True


def hierarchy_figure(species: str, image: np.ndarray, columns: list[HierarchyColumn], image_id: str = "") -> Figure:
    """One image of `species` (left) and, one column per rank from coarse to fine, the image under that rank's
    model with the trait heads of the species' ancestor taxon (rows). Map axes carry the gid 'rank:<rank>:<head>'."""
    rows = max([1, *(len(c.heads) for c in columns)])
    fig = new_figure(rows, 1 + len(columns), title_space=0.8)
    axes = fig.subplots(rows, 1 + len(columns), squeeze=False)
    show_image(axes[0, 0], image, f"{_short(species, 24)}\n{_short(image_id, 24)}")
    for r in range(1, rows):
        axes[r, 0].axis("off")
    for c, column in enumerate(columns, start=1):
        header = f"{column.rank}: {_short(column.taxon, 22)}"
        if not column.heads:
            ax = axes[0, c]
            _clean(ax)
            ax.set_gid(f"rank:{column.rank}:none")
            ax.set_title(header, fontsize=8)
            why = "no trait heads" + ("" if column.correct else "\n(misclassified)")
            ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=8, transform=ax.transAxes)
        for r, (head, frequency) in enumerate(zip(column.heads, column.frequencies)):
            title = f"head {head} · freq {frequency:.0%}"
            overlay(axes[r, c], image, column.maps[r], title=f"{header}\n{title}" if r == 0 else title)
            axes[r, c].set_gid(f"rank:{column.rank}:{head}")
        for r in range(max(1, len(column.heads)), rows):
            axes[r, c].axis("off")
    fig.suptitle(f"{species}: trait heads from coarse to fine (columns = ranks, rows = the ancestor taxon's "
                 "top trait heads)", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ inputs
class ImageSource:
    """Eval crops of manifest images by image_id (the last `cache_size` kept: memory stays bounded)."""

    def __init__(self, manifest: pd.DataFrame, img_size: int, resize: int, source: str = "manifest",
                 cache_size: int = 32):
        self.path_of = dict(zip(manifest["image_id"].astype(str), manifest["path"].astype(str)))
        self.img_size, self.resize, self.source, self.cache_size = img_size, resize, source, cache_size
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, image_id: str) -> np.ndarray:
        if image_id not in self.cache:
            if image_id not in self.path_of:
                raise KeyError(f"image {image_id!r} is not in {self.source}")
            path = self.path_of[image_id]
            if not Path(path).is_file():
                raise FileNotFoundError(f"image {image_id!r}: file not found: {path} (listed in {self.source})")
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[image_id] = eval_crop(path, self.img_size, self.resize)
        return self.cache[image_id]


def _top(traits: pd.DataFrame, n: int) -> pd.DataFrame:
    return traits.sort_values(["frequency", "mean_importance"], ascending=False, kind="stable").head(n)


# ------------------------------------------------------------------------------------------------ steps
def shared_examples(attention: AttentionFile, traits: pd.DataFrame, images: ImageSource, max_heads: int,
                    n_pairs: int = 3) -> list[SharedExample]:
    """Up to `n_pairs` (image, taxon, sibling) examples with distinct taxon pairs: correctly classified images whose
    attention.h5 row maps a sibling class (extra slots), for taxa with traits."""
    examples, seen = [], set()
    own = traits[traits["prompt"] == traits["taxon"]]  # a taxon's traits through its own prompt
    by_taxon = dict(list(own.groupby(own["taxon"].astype(str))))
    for taxon in sorted(by_taxon, key=lambda t: attention.index_of.get(t, len(attention.class_names))):
        top = _top(by_taxon[taxon], max_heads)
        for row in attention.correct_rows(taxon):
            label = attention.labels[row]
            slots = [s for s in range(2, attention.classes.shape[1])
                     if attention.classes[row, s] >= 0 and attention.classes[row, s] != label]
            slots = [s for s in slots if frozenset((label, attention.classes[row, s])) not in seen]
            if not slots:
                continue
            slot, image_id = slots[0], attention.image_ids[row]
            sibling = int(attention.classes[row, slot])
            seen.add(frozenset((label, sibling)))
            heads = top["head"].astype(int).tolist()
            maps = attention.maps(row)
            examples.append(SharedExample(images(image_id), taxon, attention.class_names[sibling], heads,
                                          top["frequency"].astype(float).tolist(), maps[0, heads], maps[slot, heads],
                                          image_id))
            break
        if len(examples) >= n_pairs:
            break
    return examples


def rank_figures(rank: str, attention_h5, traits_parquet, manifest_parquet, out_dir, settings: FigureSettings,
                 n_pairs: int = 3) -> list[Path]:
    """Write out_dir/gallery_<taxon>.png for every taxon with trait heads and out_dir/shared_traits.png (when a
    correctly classified image has a sibling class's maps); returns the paths written (none for a rank without a
    correctly classified image: the log says so)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    traits = pd.read_parquet(traits_parquet)
    traits = traits[traits["rank"] == rank] if "rank" in traits.columns else traits
    manifest = pd.read_parquet(manifest_parquet)
    written, used = [], set()
    with AttentionFile(attention_h5) as attention:
        images = ImageSource(manifest, attention.img_size, settings.resize, str(manifest_parquet))
        by_taxon = dict(list(traits.groupby(traits["taxon"].astype(str))))
        for taxon in sorted(by_taxon, key=lambda t: attention.index_of.get(t, len(attention.class_names))):
            top = _top(by_taxon[taxon], settings.max_heads)
            rows = attention.correct_rows(taxon)[: settings.gallery_images]
            if len(top) == 0 or len(rows) == 0:
                log.warning("%s %s: trait heads but no correctly classified image in %s; skipped", rank, taxon,
                            attention_h5)
                continue
            ids = [attention.image_ids[r] for r in rows]
            maps = np.stack([attention.head_maps(r, top["prompt"].tolist(), top["head"].tolist()) for r in rows])
            fig = trait_gallery(taxon, top, [images(i) for i in ids], maps, ids, rank)
            name = unique_name(f"gallery_{safe_name(taxon)}", used)
            written.append(save_figure(fig, out_dir / f"{name}.png",
                                       report_labels=labels(rank, taxon, "trait gallery")))
        examples = shared_examples(attention, traits, images, settings.max_heads, n_pairs)
    if examples:
        pairs = "; ".join(f"{e.taxon} vs {e.sibling}" for e in examples)
        written.append(save_figure(shared_traits_figure(examples, rank), out_dir / "shared_traits.png",
                                   report_labels=labels(rank, pairs, "shared traits")))
    else:
        log.warning("%s: no correctly classified image with a sibling class's maps in %s: no shared-traits figure",
                    rank, attention_h5)
    log.info("%s: %d figures in %s", rank, len(written), out_dir)
    return written


def _pick_image(candidates: list[str], files: list[AttentionFile]) -> str:
    """The candidate correctly classified at the most ranks (the first one on ties)."""
    best, best_count = candidates[0], -1
    for image_id in candidates:
        count = sum(bool(f.correct[f.row_of[image_id]]) for f in files)
        if count > best_count:
            best, best_count = image_id, count
        if count == len(files):
            break
    return best


def species_columns(species: str, files: list[AttentionFile], table: pd.DataFrame, candidates: list[str],
                    max_heads: int) -> tuple[str, list[HierarchyColumn]] | None:
    """For `species`: the image shown (among `candidates`, image ids present in every file; the one correctly
    classified at the most ranks) and one HierarchyColumn per file (rank), from hierarchy_traits rows `table`."""
    candidates = [i for i in candidates if all(i in f.row_of for f in files)]
    if not candidates:
        return None
    image_id = _pick_image(candidates, files)
    rows = table[table["species"].astype(str) == species]
    columns = []
    for attention in files:
        row = attention.row_of[image_id]
        here = _top(rows[rows["rank"] == attention.rank], max_heads)
        heads = here["head"].astype(int).tolist()
        taxon = str(here["taxon"].iloc[0]) if len(here) else attention.class_names[attention.labels[row]]
        maps = attention.head_maps(row, here["prompt"].tolist(), heads) if heads else None
        columns.append(HierarchyColumn(attention.rank, taxon, heads, here["frequency"].astype(float).tolist(), maps,
                                       bool(attention.correct[row])))
    return image_id, columns


def hierarchy_figures(attention_h5_by_rank: dict, hierarchy_parquet, manifest_parquet, out_dir, ranks: list[str],
                      settings: FigureSettings) -> list[Path]:
    """Write out_dir/<species>.png for every species of hierarchy_traits.parquet that has an image in every rank's
    attention.h5 (in the order of `ranks`, coarse to fine, the last the species'); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    species_rank = ranks[-1]
    ranks = [r for r in ranks if r in attention_h5_by_rank]
    table = pd.read_parquet(hierarchy_parquet)
    manifest = pd.read_parquet(manifest_parquet)
    written, used = [], set()
    files = [AttentionFile(attention_h5_by_rank[rank]) for rank in ranks]
    try:
        img_size = files[0].img_size if files else 0
        images = ImageSource(manifest, img_size, settings.resize, str(manifest_parquet))
        if "split" in manifest.columns:  # test images first
            manifest = manifest.iloc[np.argsort((manifest["split"] != "test").to_numpy(), kind="stable")]
        ids_of = manifest.groupby(manifest[species_rank].astype(str), sort=False)["image_id"].agg(list)
        for species, rows in table.groupby(table["species"].astype(str), sort=True):
            chosen = species_columns(species, files, rows, ids_of.get(species, []), settings.max_heads)
            if chosen is None:
                log.warning("%s: no image in every rank's attention.h5; skipped", species)
                continue
            image_id, columns = chosen
            fig = hierarchy_figure(species, images(image_id), columns, image_id)
            written.append(save_figure(fig, out_dir / f"{unique_name(safe_name(species), used)}.png",
                                       report_labels=labels(ALL_RANKS, species, "coarse to fine")))
    finally:
        for f in files:
            f.close()
    if not written:
        log.warning("hierarchy: no species has trait heads (no correctly classified image): no figure")
    log.info("hierarchy: %d figures in %s", len(written), out_dir)
    return written


# ------------------------------------------------------------------------------------------------ the key
KEY_MAX_TAXA = 48  # ranks with more taxa than this are left out of the key figure (it would be unreadable)


def leaf_order(classes: pd.DataFrame, ranks: list[str]) -> dict[tuple[str, str], float]:
    """x position of every (rank, taxon) in a drawing of the tree: leaves 0, 1, ... in depth-first order, each
    internal taxon at the mean of its children."""
    children: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for depth, rank in enumerate(ranks):
        rows = classes[classes["rank"] == rank].sort_values("class_index")
        for taxon, parent in zip(rows["taxon"].astype(str), rows["parent"].fillna("").astype(str)):
            above = (ranks[depth - 1], parent) if depth else ("", "")
            children.setdefault(above, []).append((rank, taxon))
    position: dict[tuple[str, str], float] = {}

    def place(node) -> float:
        kids = children.get(node, [])
        if not kids:
            position[node] = float(sum(1 for n in position if not children.get(n)))
        else:
            position[node] = float(np.mean([place(kid) for kid in kids]))
        return position[node]

    place(("", ""))
    position.pop(("", ""))
    return position


def key_figure(key: pd.DataFrame, classes: pd.DataFrame, ranks: list[str], attention: dict[str, AttentionFile],
               images: ImageSource) -> Figure:
    """The key as a tree (the Prompt-CAM paper's Figure 9 for every fork at once): one row per rank, each taxon at its
    place in the tree, linked to its parent, showing its top trait head's map on a correctly classified image of it
    (a monotypic taxon: the image alone). Ranks with more than KEY_MAX_TAXA taxa are left out."""
    shown = [r for r in ranks if (classes["rank"] == r).sum() <= KEY_MAX_TAXA] or ranks[:1]
    position = leaf_order(classes, ranks)
    x_of = {node: x for node, x in position.items() if node[0] in shown}
    span = max(x_of.values()) - min(x_of.values()) + 1 if x_of else 1
    cell = 1.25
    fig = Figure(figsize=(max(span * cell, 6.0), len(shown) * 1.95 + 0.7), dpi=DPI)
    FigureCanvasAgg(fig)
    low = min(x_of.values()) if x_of else 0.0
    tree = fig.add_axes([0, 0, 1, 1])
    tree.set_xlim(0, fig.get_figwidth())
    tree.set_ylim(0, fig.get_figheight())
    tree.axis("off")
    size = cell * 0.82
    parents = dict(zip(zip(classes["rank"], classes["taxon"].astype(str)), classes["parent"].fillna("").astype(str)))
    row_y = {rank: fig.get_figheight() - 0.3 - (depth + 1) * 1.95 for depth, rank in enumerate(shown)}  # inches
    centre = {(rank, taxon): ((x - low + 0.5) * cell + (fig.get_figwidth() - span * cell) / 2, row_y[rank])
              for (rank, taxon), x in x_of.items()}
    for (rank, taxon), (cx, cy) in centre.items():
        depth = ranks.index(rank)
        above = (ranks[depth - 1], parents[(rank, taxon)]) if depth else None
        if above in centre:
            px, py = centre[above]
            tree.plot([px, px, cx, cx], [py - 0.02, (py + cy + size) / 2, (py + cy + size) / 2, cy + size + 0.28],
                      color="0.55", lw=0.8)
    for (rank, taxon), (cx, cy) in centre.items():
        ax = fig.add_axes([(cx - size / 2) / fig.get_figwidth(), cy / fig.get_figheight(),
                           size / fig.get_figwidth(), size / fig.get_figheight()])
        file = attention[rank]
        rows = file.correct_rows(taxon)
        top = _top(key[(key["rank"] == rank) & (key["taxon"] == taxon)], 1)
        if not len(rows):
            _clean(ax)
            ax.set_title(_short(taxon, 18), fontsize=7)
            ax.text(0.5, 0.5, "no correctly\nclassified image", ha="center", va="center", fontsize=6,
                    transform=ax.transAxes)
            continue
        image = images(file.image_ids[rows[0]])
        if len(top):
            trait = top.iloc[0]
            whose = "" if trait["prompt"] == taxon else f" of {_short(str(trait['prompt']), 12)}"
            where = f" · {trait['part']}" if isinstance(trait["part"], str) and trait["part"] else ""
            overlay(ax, image, file.head_maps(rows[0], [trait["prompt"]], [int(trait["head"])])[0],
                    title=f"{_short(taxon, 18)}\nh{int(trait['head'])}{whose}{where} {trait['frequency']:.0%}",
                    fontsize=6)
        else:
            show_image(ax, image, f"{_short(taxon, 18)}\n(monotypic)", fontsize=6)
    for rank, y in row_y.items():
        tree.text(0.08, y + size / 2, rank, rotation=90, ha="left", va="center", fontsize=9, color="0.3")
    left_out = [r for r in ranks if r not in shown]
    fig.suptitle("Key: at each fork, each child's top trait head on one of its images"
                 + (f" (not drawn: {', '.join(left_out)}, more than {KEY_MAX_TAXA} taxa)" if left_out else ""),
                 fontsize=10, y=1 - 0.25 / fig.get_figheight())
    return fig


def key_figures(key_parquet, classes_parquet, attention_h5_by_rank: dict, manifest_parquet, out_path,
                ranks: list[str], resize: int) -> Path:
    """Write the key figure (`key_figure`) of a run to `out_path` (`ranks` coarse to fine; `resize`: the eval crop's
    augment.resize)."""
    ranks = [r for r in ranks if r in attention_h5_by_rank]
    manifest = pd.read_parquet(manifest_parquet)
    files = {rank: AttentionFile(attention_h5_by_rank[rank]) for rank in ranks}
    try:
        images = ImageSource(manifest, files[ranks[0]].img_size, resize, str(manifest_parquet))
        fig = key_figure(pd.read_parquet(key_parquet), pd.read_parquet(classes_parquet), ranks, files, images)
        return save_figure(fig, out_path, tight=False)
    finally:
        for f in files.values():
            f.close()
