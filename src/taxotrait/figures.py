"""Figures of trait heads: attention overlays, per-taxon trait galleries, traits shared with a sibling taxon, and the
coarse-to-fine view of one species across ranks (as in the Prompt-CAM paper's Figure 9).

Images are shown as the model saw them: the eval crop (shorter side resized to ``augment.resize``, centre crop of the
model's image size), un-normalised. Maps come from ``attention.h5`` (read through `taxotrait.attention_store`): the
last-block attention of a class prompt over the patch grid, upsampled bilinearly to the crop and min-max normalised
per map.

The plotting functions take arrays and return `matplotlib.figure.Figure` objects (Agg rendering, no pyplot state),
so they can be used from a notebook; `rank_figures`, `hierarchy_figures` and `key_figures` are the workflow steps
that read the result files and write PNGs. They read attention.h5 and the manifest in their own process and hand
each figure's data to a pool of drawing processes (`FigurePool`), so a step's time is bounded by its processes and
its memory by the figures in flight, whatever the number of taxa; the report shows a bounded selection of each
folder and its index page (`taxotrait.report.publish_figures`).
"""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing as mp
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from .attention_store import AttentionFile
from .data import AugmentConfig, ImageTransform, load_image
from .dataset import read_manifest_table
from .faithfulness import upsample
from .io import atomic_write, parquet_columns
from .report import ALL_RANKS, ALL_TAXA, INDEX, evenly_spaced, labels, png_labels, publish_figures

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
    """What the figures show: `resize` (augment.resize, the eval crop's), `gallery_images` images per trait gallery,
    `max_heads` trait heads per taxon and `report_galleries` figures of a folder shown in the report
    (figures.gallery_images, figures.max_heads, figures.report_galleries)."""

    resize: int
    gallery_images: int
    max_heads: int
    report_galleries: int


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
@dataclass(frozen=True)
class Crop:
    """The eval crop of the model's images (`img_size`, augment.resize): `crop(path)` -> RGB float [S, S, 3]."""

    img_size: int
    resize: int

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        return eval_crop(path, self.img_size, self.resize)


IMAGE_COLUMNS = ["image_id", "path"]  # what ImageSource reads of the manifest


class ImageSource:
    """Eval crops of manifest images by image_id (the last `cache_size` kept: memory stays bounded)."""

    def __init__(self, manifest: pd.DataFrame, img_size: int, resize: int, source: str = "manifest",
                 cache_size: int = 32):
        self.path_of = dict(zip(manifest["image_id"].astype(str), manifest["path"].astype(str)))
        self.crop, self.source, self.cache_size = Crop(img_size, resize), source, cache_size
        self.cache: dict[str, np.ndarray] = {}

    def path(self, image_id: str) -> str:
        """The file of `image_id`; KeyError or FileNotFoundError naming the manifest when it has none."""
        if image_id not in self.path_of:
            raise KeyError(f"image {image_id!r} is not in {self.source}")
        path = self.path_of[image_id]
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {image_id!r}: file not found: {path} (listed in {self.source})")
        return path

    def __call__(self, image_id: str) -> np.ndarray:
        if image_id not in self.cache:
            path = self.path(image_id)
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[image_id] = self.crop(path)
        return self.cache[image_id]


def _top(traits: pd.DataFrame, n: int) -> pd.DataFrame:
    return traits.sort_values(["frequency", "mean_importance"], ascending=False, kind="stable").head(n)


def correct_rows_by_class(attention: AttentionFile) -> dict[int, np.ndarray]:
    """The rows of the correctly classified images of every class (by class index), in file order: one pass over
    the file rather than one per taxon (`AttentionFile.correct_rows`)."""
    rows = np.flatnonzero(attention.correct)
    rows = rows[np.argsort(attention.labels[rows], kind="stable")]
    classes, starts = np.unique(attention.labels[rows], return_index=True)
    return {int(c): part for c, part in zip(classes, np.split(rows, starts[1:]))}


NO_ROWS = np.array([], dtype=np.int64)


# ------------------------------------------------------------------------------------------------ drawing processes
def _start_worker() -> None:
    """A drawing process: torch on one thread (the parent's OpenMP threads do not survive the fork)."""
    torch.set_num_threads(1)


class FigurePool:
    """`workers` processes drawing figures (none for 1: drawn in this process). They are forked when the pool is
    entered, before the caller opens attention.h5: a job carries everything its figure shows (maps, image paths), so
    only the caller reads the HDF5 files. `map` keeps at most two jobs per worker in flight, so memory stays bounded
    whatever the number of figures."""

    def __init__(self, workers: int = 1):
        self.workers, self.pool = max(1, int(workers)), None

    def __enter__(self) -> "FigurePool":
        if self.workers > 1:
            self.pool = mp.get_context("fork").Pool(self.workers, initializer=_start_worker)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def map(self, draw, jobs: Iterable) -> Iterator:
        """draw(job) for every job, in order."""
        if self.pool is None:
            yield from map(draw, jobs)
            return
        pending: deque = deque()
        for job in jobs:
            pending.append(self.pool.apply_async(draw, (job,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


Written = tuple[Path, dict]  # a figure written and its report labels


def _drawn(jobs: Iterable, draw, pool: FigurePool, total: int, what: str) -> list[Written]:
    return list(tqdm(pool.map(draw, jobs), total=total, desc=what, unit="figure"))


def _publish(out_dir: Path, written: list[Written], shown: int, title: str, index_labels: dict,
             always: list[Written] = ()) -> list[Path]:
    """`written` and `always` in out_dir's index, `shown` of `written` (evenly spread) and `always` in the report."""
    everything = [*written, *always]
    chosen = [written[i][0] for i in evenly_spaced(len(written), shown)] + [path for path, _ in always]
    publish_figures(out_dir, everything, chosen, title, index_labels)
    return [path for path, _ in everything]


# ------------------------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class GalleryJob:
    """A trait gallery to draw (`trait_gallery`) at `path`: its taxon's top traits, images and their maps."""

    path: Path
    rank: str
    taxon: str
    traits: pd.DataFrame
    image_ids: list[str]
    image_paths: list[str]
    maps: np.ndarray
    crop: Crop


def draw_gallery(job: GalleryJob) -> Written:
    """Draw and write a GalleryJob."""
    fig = trait_gallery(job.taxon, job.traits, [job.crop(p) for p in job.image_paths], job.maps, job.image_ids,
                        job.rank)
    found = labels(job.rank, job.taxon, "trait gallery")
    return save_figure(fig, job.path, report_labels=found), found


def gallery_jobs(rank: str, attention: AttentionFile, traits: pd.DataFrame, images: ImageSource,
                 settings: FigureSettings, out_dir: Path) -> Iterator[GalleryJob]:
    """The gallery of every taxon of `traits` with a correctly classified image, in the file's class order."""
    rows_of, used = correct_rows_by_class(attention), set()
    by_taxon = dict(list(traits.groupby(traits["taxon"].astype(str))))
    for taxon in sorted(by_taxon, key=lambda t: attention.index_of.get(t, len(attention.class_names))):
        top = _top(by_taxon[taxon], settings.max_heads)
        rows = rows_of.get(attention.index_of.get(taxon, -1), NO_ROWS)[: settings.gallery_images]
        if len(top) == 0 or len(rows) == 0:
            log.warning("%s %s: trait heads but no correctly classified image in %s; skipped", rank, taxon,
                        attention.path)
            continue
        ids = [attention.image_ids[r] for r in rows]
        maps = np.stack([attention.head_maps(r, top["prompt"].tolist(), top["head"].tolist()) for r in rows])
        name = unique_name(f"gallery_{safe_name(taxon)}", used)
        yield GalleryJob(out_dir / f"{name}.png", rank, taxon, top, ids, [images.path(i) for i in ids], maps,
                         images.crop)


def shared_examples(attention: AttentionFile, traits: pd.DataFrame, images: ImageSource, max_heads: int,
                    n_pairs: int = 3) -> list[SharedExample]:
    """Up to `n_pairs` (image, taxon, sibling) examples with distinct taxon pairs: correctly classified images whose
    attention.h5 row maps a sibling class (extra slots), for taxa with traits."""
    examples, seen = [], set()
    own = traits[traits["prompt"] == traits["taxon"]]  # a taxon's traits through its own prompt
    by_taxon = dict(list(own.groupby(own["taxon"].astype(str))))
    rows_of = correct_rows_by_class(attention)
    for taxon in sorted(by_taxon, key=lambda t: attention.index_of.get(t, len(attention.class_names))):
        top = _top(by_taxon[taxon], max_heads)
        for row in rows_of.get(attention.index_of.get(taxon, -1), NO_ROWS):
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
                 n_pairs: int = 3, workers: int = 1) -> list[Path]:
    """Write out_dir/gallery_<taxon>.png for every taxon with trait heads (drawn by `workers` processes) and
    out_dir/shared_traits.png (when a correctly classified image has a sibling class's maps), then the report's part
    of out_dir (`taxotrait.report.publish_figures`: settings.report_galleries galleries and the shared traits, and
    index.html); returns the figures written (none for a rank without a correctly classified image: the log says
    so)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    traits = pd.read_parquet(traits_parquet)
    traits = traits[traits["rank"] == rank] if "rank" in traits.columns else traits
    manifest = read_manifest_table(manifest_parquet, IMAGE_COLUMNS)
    with FigurePool(workers) as pool, AttentionFile(attention_h5) as attention:
        images = ImageSource(manifest, attention.img_size, settings.resize, str(manifest_parquet))
        galleries = _drawn(gallery_jobs(rank, attention, traits, images, settings, out_dir), draw_gallery, pool,
                           traits["taxon"].nunique(), f"{rank} galleries")
        examples = shared_examples(attention, traits, images, settings.max_heads, n_pairs)
    shared = []
    if examples:
        pairs = "; ".join(f"{e.taxon} vs {e.sibling}" for e in examples)
        found = labels(rank, pairs, "shared traits")
        shared.append((save_figure(shared_traits_figure(examples, rank), out_dir / "shared_traits.png",
                                   report_labels=found), found))
    else:
        log.warning("%s: no correctly classified image with a sibling class's maps in %s: no shared-traits figure",
                    rank, attention_h5)
    written = _publish(out_dir, galleries, settings.report_galleries, f"Trait galleries: {rank}",
                       labels(rank, ALL_TAXA, "gallery index"), shared)
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


@dataclass(frozen=True)
class HierarchyJob:
    """A coarse-to-fine figure to draw (`hierarchy_figure`) at `path`: its species' image and columns."""

    path: Path
    species: str
    image_id: str
    image_path: str
    columns: list[HierarchyColumn]
    crop: Crop


def draw_hierarchy(job: HierarchyJob) -> Written:
    """Draw and write a HierarchyJob."""
    fig = hierarchy_figure(job.species, job.crop(job.image_path), job.columns, job.image_id)
    found = labels(ALL_RANKS, job.species, "coarse to fine")
    return save_figure(fig, job.path, report_labels=found), found


def hierarchy_figures(attention_h5_by_rank: dict, hierarchy_parquet, manifest_parquet, out_dir, ranks: list[str],
                      settings: FigureSettings, workers: int = 1) -> list[Path]:
    """Write out_dir/<species>.png for every species of hierarchy_traits.parquet that has an image in every rank's
    attention.h5 (in the order of `ranks`, coarse to fine, the last the species'), drawn by `workers` processes, then
    the report's part of out_dir (settings.report_galleries of them and index.html); returns the figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    species_rank = ranks[-1]
    ranks = [r for r in ranks if r in attention_h5_by_rank]
    table = pd.read_parquet(hierarchy_parquet)
    split_column = ["split"] if "split" in parquet_columns(manifest_parquet) else []
    manifest = read_manifest_table(manifest_parquet, [*IMAGE_COLUMNS, species_rank, *split_column])
    if split_column:  # test images first
        manifest = manifest.iloc[np.argsort((manifest["split"] != "test").to_numpy(), kind="stable")]
    ids_of = manifest.groupby(manifest[species_rank].astype(str), sort=False)["image_id"].agg(list)

    def jobs(files: list[AttentionFile], images: ImageSource) -> Iterator[HierarchyJob]:
        used = {INDEX}  # the folder's index page is index.html
        for species, rows in table.groupby(table["species"].astype(str), sort=True):
            chosen = species_columns(species, files, rows, ids_of.get(species, []), settings.max_heads)
            if chosen is None:
                log.warning("%s: no image in every rank's attention.h5; skipped", species)
                continue
            image_id, columns = chosen
            yield HierarchyJob(out_dir / f"{unique_name(safe_name(species), used)}.png", species, image_id,
                               images.path(image_id), columns, images.crop)

    with FigurePool(workers) as pool, ExitStack() as stack:
        files = [stack.enter_context(AttentionFile(attention_h5_by_rank[rank])) for rank in ranks]
        images = ImageSource(manifest, files[0].img_size if files else 0, settings.resize, str(manifest_parquet))
        drawn = _drawn(jobs(files, images), draw_hierarchy, pool, table["species"].nunique(), "coarse to fine")
    if not drawn:
        log.warning("hierarchy: no species has trait heads (no correctly classified image): no figure")
    written = _publish(out_dir, drawn, settings.report_galleries, "Coarse to fine: every species",
                       labels(kind="coarse-to-fine index"))
    log.info("hierarchy: %d figures in %s", len(written), out_dir)
    return written


# ------------------------------------------------------------------------------------------------ the key
Node = tuple[str, str]  # a taxon of the key: (rank, taxon)
ROOT: Node = ("", "")  # above the top rank
# A key page holds at most KEY_PAGE_COLUMNS taxa side by side and KEY_PAGE_ROWS ranks, KEY_CELL inches per taxon and
# KEY_ROW per rank: at 100 dpi at most 6000 x 1630 pixels (under 20 Mpx, PIL's guard is 89 Mpx) at any taxonomy size.
KEY_PAGE_COLUMNS, KEY_PAGE_ROWS = 48, 8
KEY_CELL, KEY_ROW = 1.25, 1.95


def taxon_tree(classes: pd.DataFrame, ranks: list[str]) -> dict[Node, list[Node]]:
    """The children of every taxon of `ranks` (coarse to fine) in classes.parquet, in class_index order; ROOT's:
    the top rank's taxa."""
    children: dict[Node, list[Node]] = {}
    for depth, rank in enumerate(ranks):
        rows = classes[classes["rank"] == rank].sort_values("class_index")
        for taxon, parent in zip(rows["taxon"].astype(str), rows["parent"].fillna("").astype(str)):
            children.setdefault((ranks[depth - 1], parent) if depth else ROOT, []).append((rank, taxon))
    return children


def leaf_order(children: dict[Node, list[Node]], top: list[Node]) -> dict[Node, float]:
    """x position of every taxon of the tree below `top` (`children`: the links drawn): leaves 0, 1, ... in
    depth-first order, each other taxon at the mean of its children."""
    position: dict[Node, float] = {}
    leaves = itertools.count()

    def place(node: Node) -> float:
        kids = children.get(node, [])
        position[node] = float(np.mean([place(kid) for kid in kids])) if kids else float(next(leaves))
        return position[node]

    for node in top:
        place(node)
    return position


@dataclass
class KeyPage:
    """One page of the key figure: `levels`, the taxa it draws rank by rank (coarse to fine), the first a run of the
    children of `context` (ROOT, or a taxon drawn on page `context_page`), the `part`-th of (part, parts) runs;
    `children`: the links drawn; `links`: its taxa whose children continue on another page, and that page."""

    number: int
    context: Node
    part: tuple[int, int]
    levels: list[list[Node]]
    children: dict[Node, list[Node]]
    context_page: int | None = None
    links: dict[Node, int] = field(default_factory=dict)

    @property
    def taxa(self) -> list[Node]:
        return [node for level in self.levels for node in level]


def _width(children: dict[Node, list[Node]], node: Node, depth: int, cap: int) -> int:
    """Columns of `node`'s tree drawn `depth` ranks deep (its leaves), counted up to just past `cap`."""
    kids = children.get(node, []) if depth > 1 else []
    total = 0
    for kid in kids:
        total += _width(children, kid, depth - 1, cap - total)
        if total > cap:
            break
    return total or 1


def key_pages(children: dict[Node, list[Node]], columns: int = KEY_PAGE_COLUMNS,
              rows: int = KEY_PAGE_ROWS) -> list[KeyPage]:
    """The key figure cut into pages of at most `columns` taxa side by side and `rows` ranks, every taxon of the tree
    (`taxon_tree`) on exactly one page. A page holds a run of children of one taxon, each with its descendants down
    to the page's last rank; a child whose descendants would not fit on a page by themselves is drawn alone, its
    children starting pages of their own, as do those of the page's last rank. Pages are numbered depth-first from
    the top of the tree."""
    pages: list[KeyPage] = []
    stack = [ROOT]
    while stack:
        context = stack.pop()
        runs: list[list[tuple[Node, bool]]] = []
        used = columns
        for node in children.get(context, []):
            width = _width(children, node, rows, columns)
            whole = width <= columns  # drawn with its descendants
            if used + (width if whole else 1) > columns:
                runs.append([])
                used = 0
            runs[-1].append((node, whole))
            used += width if whole else 1
        continued = []
        for part, run in enumerate(runs, start=1):
            levels, drawn = [[node for node, _ in run]], {}
            expand = [node for node, whole in run if whole]
            while len(levels) < rows:
                drawn.update({node: children[node] for node in expand if children.get(node)})
                expand = [kid for node in expand for kid in children.get(node, [])]
                if not expand:
                    break
                levels.append(expand)
            pages.append(KeyPage(len(pages) + 1, context, (part, len(runs)), levels, drawn))
            continued += [node for node in _depth_first(drawn, levels[0]) if children.get(node) and node not in drawn]
        stack.extend(reversed(continued))
    page_of = {node: page.number for page in pages for node in page.taxa}
    first_page: dict[Node, int] = {}
    for page in pages:
        first_page.setdefault(page.context, page.number)
    for page in pages:
        page.context_page = page_of.get(page.context)
        page.links = {node: first_page[node] for node in page.taxa if node in first_page}
    return pages


def _depth_first(children: dict[Node, list[Node]], top: list[Node]) -> Iterator[Node]:
    for node in top:
        yield node
        yield from _depth_first(children, children.get(node, []))


@dataclass(frozen=True)
class KeyPanel:
    """A taxon's panel on a key page: its title and one of its images (`image_path`, shown as its eval crop) with its
    top trait head's map (`heat`; None: the image alone), or, without an image, a `note`."""

    title: str
    image_path: str | None = None
    heat: np.ndarray | None = None
    note: str = ""


def key_page_title(page: KeyPage, n_pages: int) -> str:
    """The title of a key page: what it holds and where its taxa's parent is drawn."""
    head = f"Key, page {page.number} of {n_pages}"
    if page.context == ROOT:
        where = ": at each fork, each child's best key entry (present, or absent: on the sibling's image)"
    else:
        where = f": below {page.context[0]} {page.context[1]} (page {page.context_page})"
    part, parts = page.part
    whose = "the top rank's taxa" if page.context == ROOT else "its children"
    return head + where + (f", part {part} of {parts} of {whose}" if parts > 1 else "")


def key_page_figure(page: KeyPage, panels: dict[Node, KeyPanel], crop: Crop, title: str) -> Figure:
    """A key page as a tree (the Prompt-CAM paper's Figure 9 for every fork it holds): one row per rank, each taxon
    at its place in the tree, linked to its parent, showing its panel (the image loaded with `crop`); a taxon whose
    children continue on another page says which. Each panel's axes carry the gid 'taxon:<rank>:<taxon>'. At most
    KEY_PAGE_COLUMNS x KEY_CELL by KEY_PAGE_ROWS x KEY_ROW + 0.7 inches (`key_pages`)."""
    x_of = leaf_order(page.children, page.levels[0])
    span = max(x_of.values()) + 1
    fig = Figure(figsize=(max(span * KEY_CELL, 6.0), len(page.levels) * KEY_ROW + 0.7), dpi=DPI)
    FigureCanvasAgg(fig)
    width, height = fig.get_figwidth(), fig.get_figheight()
    tree = fig.add_axes([0, 0, 1, 1])
    tree.set_xlim(0, width)
    tree.set_ylim(0, height)
    tree.axis("off")
    size = KEY_CELL * 0.82
    row_y = [height - 0.3 - (depth + 1) * KEY_ROW for depth in range(len(page.levels))]  # inches
    centre = {node: ((x_of[node] + 0.5) * KEY_CELL + (width - span * KEY_CELL) / 2, row_y[depth])
              for depth, level in enumerate(page.levels) for node in level}
    for parent, kids in page.children.items():
        px, py = centre[parent]
        for kid in kids:
            cx, cy = centre[kid]
            middle = (py + cy + size) / 2
            tree.plot([px, px, cx, cx], [py - 0.02, middle, middle, cy + size + 0.28], color="0.55", lw=0.8)
    for node, (cx, cy) in centre.items():
        ax = fig.add_axes([(cx - size / 2) / width, cy / height, size / width, size / height])
        ax.set_gid(f"taxon:{node[0]}:{node[1]}")
        panel = panels[node]
        if panel.image_path is None:
            _clean(ax)
            ax.set_title(panel.title, fontsize=7)
            ax.text(0.5, 0.5, panel.note, ha="center", va="center", fontsize=6, transform=ax.transAxes)
        elif panel.heat is None:
            show_image(ax, crop(panel.image_path), panel.title, fontsize=6)
        else:
            overlay(ax, crop(panel.image_path), panel.heat, title=panel.title, fontsize=6)
        if node in page.links:
            ax.set_xlabel(f"children: page {page.links[node]}", fontsize=6)
    for level, y in zip(page.levels, row_y):
        tree.text(0.08, y + size / 2, level[0][0], rotation=90, ha="left", va="center", fontsize=9, color="0.3")
    fig.suptitle(title, fontsize=10, y=1 - 0.25 / height)
    return fig


def key_panel(node: Node, attention: AttentionFile, rows_of: dict[int, np.ndarray], entry: dict | None,
              images: ImageSource, monotypic: bool = False) -> KeyPanel:
    """The panel of `node` (`KeyPanel`) under its best key entry `entry` (a key.parquet row; None for a `monotypic`
    taxon or one without entry): a present trait on the taxon's first correctly classified image (`rows_of`: such
    rows by class index), an absent one where it is, on the first such image of the sibling whose prompt it is
    (marked as absent in this taxon)."""
    taxon = node[1]
    owner = taxon if entry is None else str(entry["prompt"])
    rows = rows_of.get(attention.index_of.get(owner, -1), NO_ROWS)
    if not len(rows):
        return KeyPanel(_short(taxon, 18), note="no correctly\nclassified image")
    path = images.path(attention.image_ids[rows[0]])
    if entry is None:
        return KeyPanel(f"{_short(taxon, 18)}\n({'monotypic' if monotypic else 'no entry'})", path)
    where = f" · {entry['part']}" if isinstance(entry["part"], str) and entry["part"] else ""
    heat = attention.head_maps(rows[0], [owner], [int(entry["head"])])[0]
    if owner == taxon:
        return KeyPanel(f"{_short(taxon, 18)}\nh{int(entry['head'])}{where} present", path, heat)
    return KeyPanel(f"{_short(taxon, 18)}: lacks\nh{int(entry['head'])}{where} of {_short(owner, 12)}", path, heat)


@dataclass(frozen=True)
class KeyPageJob:
    """A key page to draw (`key_page_figure`) at `path`, with its panels and report labels."""

    path: Path
    page: KeyPage
    panels: dict[Node, KeyPanel]
    title: str
    crop: Crop
    labels: dict


def draw_key_page(job: KeyPageJob) -> Written:
    """Draw and write a KeyPageJob (its size as drawn: `tight` cropping would move the panels)."""
    fig = key_page_figure(job.page, job.panels, job.crop, job.title)
    return save_figure(fig, job.path, tight=False, report_labels=job.labels), job.labels


def key_figures(key_parquet, classes_parquet, attention_h5_by_rank: dict, manifest_parquet, out_dir,
                ranks: list[str], resize: int, report_pages: int, workers: int = 1) -> list[Path]:
    """Write the key figure of a run as pages (`key_pages`, `key_page_figure`; `ranks` coarse to fine; `resize`:
    the eval crop's augment.resize) to out_dir/key_<page>_<taxon above it>.png, drawn by `workers` processes, then
    the report's part of out_dir (`report_pages` pages, the first included, and index.html); returns the pages."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = [r for r in ranks if r in attention_h5_by_rank]
    classes = pd.read_parquet(classes_parquet)
    tree = taxon_tree(classes, ranks)
    monotypic = {kids[0] for kids in tree.values() if len(kids) == 1}
    pages = key_pages(tree)
    key = pd.read_parquet(key_parquet)
    best = key[key["entry"] == 1]  # each taxon's best entry
    entry_of = {(str(r), str(t)): row for r, t, row in zip(best["rank"], best["taxon"], best.to_dict("records"))}
    manifest = read_manifest_table(manifest_parquet, IMAGE_COLUMNS)
    digits = len(str(len(pages)))

    def jobs(files: dict[str, AttentionFile], images: ImageSource) -> Iterator[KeyPageJob]:
        rows_of = {rank: correct_rows_by_class(file) for rank, file in files.items()}
        for page in pages:
            panels = {node: key_panel(node, files[node[0]], rows_of[node[0]], entry_of.get(node), images,
                                      node in monotypic) for node in page.taxa}
            above = page.context if page.context != ROOT else (ALL_RANKS, ALL_TAXA)
            name = f"key_{page.number:0{digits}d}_{safe_name(page.context[1] or 'top')}"
            yield KeyPageJob(out_dir / f"{name}.png", page, panels, key_page_title(page, len(pages)), images.crop,
                             labels(above[0], above[1], "key figure"))

    with FigurePool(workers) as pool, ExitStack() as stack:
        files = {rank: stack.enter_context(AttentionFile(attention_h5_by_rank[rank])) for rank in ranks}
        images = ImageSource(manifest, files[ranks[0]].img_size, resize, str(manifest_parquet))
        drawn = _drawn(jobs(files, images), draw_key_page, pool, len(pages), "key pages")
    written = _publish(out_dir, drawn, report_pages, "Key figure: every page", labels(kind="key index"))
    log.info("key: %d pages in %s", len(written), out_dir)
    return written
