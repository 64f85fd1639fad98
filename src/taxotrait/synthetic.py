"""Seeded synthetic taxonomy of stylised fish with planted traits per rank and ground-truth masks.

The demo dataset of the workflow: a small tree of taxa (orders > families > genera > species)
where every rank has one planted visual trait, drawn so that a frozen self-supervised ViT
(DINOv2 ViT-S/14 at 224 px) can see it, together with a pixel mask of where it is.

Planted traits (the value of a taxon is chosen by its index among its siblings, so e.g. the
first family of every order has a forked purple tail):

=========  =========================  ====================================  ============
rank       trait                      variants (sibling 1, 2, ...)           mask key
=========  =========================  ====================================  ============
order      body shape                 elongated, deep, boxy, rhomboid        ``order``
family     tail shape and colour      forked purple, rounded green, ...      ``family``
genus      flank pattern              3 vertical stripes, 2 horizontal, ...  ``genus``
species    mark colour                yellow, cyan, magenta, white, ...      ``species``
(none)     red mark, on every fish    not informative (a distractor)         ``distractor``
=========  =========================  ====================================  ============

A fork with more siblings than these base variants (4 body shapes, 4 tails, 5 patterns, 6 mark
colours) takes combined ones after them (:data:`VARIANTS`, at most :data:`MAX_SIBLINGS` per fork:
16, 24, 16, 36): the body shapes with their height scaled by 0.8, 1.25 and 1.5; every tail shape
with every other of 6 tail colours; the patterns with other stripe counts and widths, spots in one
row and vertical stripes crossed by a midline stripe; every mark colour with a centre dot of every
other. The base variants are drawn exactly as before, so small taxonomies keep their bytes.

Every fish also has an eye, an operculum line, a mouth and dorsal/anal fins (common to all, in
no mask) on a cluttered, low-contrast background, at a random position and scale, rotated by up
to +-15 degrees and flipped horizontally at random. Shapes are drawn with PIL at 2x and
box-downsampled; masks come from the same 2x label raster (a pixel is in a mask when at least
half of its 2x2 sub-pixels are), so every transform is applied identically to image and masks.

Masks (``masks/<image_id>.npz``, one compressed ``.npz`` per image, readable with
:func:`taxotrait.groundtruth.load_masks` or ``np.load``; keys :data:`MASK_KEYS`, bool arrays of shape (H, W)):

- ``order``: the body silhouette (it contains the genus region, both marks, the eye);
- ``family``: the visible tail (behind the body, so disjoint from ``order``);
- ``genus``: the flank region that carries the pattern (stripes *and* the gaps between them,
  clipped to the body): the pattern is a texture, so the region, not the stripe pixels, is
  what a patch-level attention map should point at;
- ``species``: the round species mark behind the head (~24 px across at 224 px), its centre dot included;
- ``distractor``: the red mark of the same size mid-body.

``species``, ``distractor`` and ``genus`` are pairwise disjoint and inside ``order``.

Output layout of :func:`generate_dataset` (paths in the CSVs are relative to ``out_dir``)::

    out_dir/images/<split>/<species>/<image_id>.png
    out_dir/masks/<image_id>.npz
    out_dir/taxonomy.csv   order,family,genus,species   (one row per species)
    out_dir/manifest.csv   image_id,path,split,order,family,genus,species,mask_path,
                           flipped,angle,scale          (one row per image)
    out_dir/traits.csv     rank,taxon,trait,value,mask_key   (one row per taxon)

Output is byte-identical for the same arguments whatever the number of workers: each image's
random stream is derived from ``(seed, image index)``; PNGs and the zip members of the .npz
files carry no timestamps.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .groundtruth import load_masks, save_masks

__all__ = [
    "MASK_KEYS",
    "RANKS",
    "SPLITS",
    "BODY_SHAPES",
    "TAILS",
    "PATTERNS",
    "MARK_COLOURS",
    "VARIANTS",
    "MAX_SIBLINGS",
    "DISTRACTOR_COLOUR",
    "Species",
    "build_taxonomy",
    "trait_table",
    "render_fish",
    "counterfactual_fish",
    "swapped_sibling",
    "head_direction",
    "generate_dataset",
    "contact_sheet",
    "main",
]

RANKS = ("order", "family", "genus", "species")
MASK_KEYS = ("order", "family", "genus", "species", "distractor")
SPLITS = ("train", "val", "test")

# Nominal geometry is in pixels of a 224 px image; everything scales with image_size / 224.
NOMINAL = 224.0
SUPERSAMPLE = 2


@dataclass(frozen=True)
class BodyShape:
    name: str
    a: float  # half length
    b: float  # half height
    n: float  # superellipse exponent (2 = ellipse)
    k: float  # fullness towards the head (0 = symmetric)

    @property
    def value(self) -> str:
        return self.name

    def half_height(self, x: np.ndarray | float) -> np.ndarray:
        u = np.clip(np.abs(np.asarray(x, dtype=float)) / self.a, 0.0, 1.0)
        return self.b * (1.0 - u**self.n) ** (1.0 / self.n) * (1.0 + self.k * np.asarray(x) / self.a)

    def outline(self, m: int = 96) -> np.ndarray:
        t = np.linspace(0.0, 2.0 * np.pi, m, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        x = self.a * np.sign(c) * np.abs(c) ** (2.0 / self.n)
        y = self.b * np.sign(s) * np.abs(s) ** (2.0 / self.n) * (1.0 + self.k * x / self.a)
        return np.stack([x, y], axis=1)


@dataclass(frozen=True)
class Tail:
    shape: str
    colour_name: str
    colour: tuple[int, int, int]

    @property
    def value(self) -> str:
        return f"{self.shape} {self.colour_name}"


@dataclass(frozen=True)
class Pattern:
    kind: str  # vertical | horizontal | spots | diagonal | band | grid (vertical stripes and a midline stripe)
    count: int
    value: str
    width: float  # of a stripe (spots: diameter), nominal px


@dataclass(frozen=True)
class Mark:
    colour_name: str
    colour: tuple[int, int, int]
    centre_name: str | None = None  # a dot of another colour in the middle of the mark
    centre: tuple[int, int, int] | None = None

    @property
    def value(self) -> str:
        return f"{self.colour_name} mark" + (f" with a {self.centre_name} centre" if self.centre_name else "")


# Order: body shape. Family: tail shape and colour. Genus: flank pattern. Species: mark colour.
# The base variants (the first siblings of every fork, the demo's); the combined ones below extend them.
BODY_SHAPES = (
    BodyShape("elongated", a=80.0, b=25.0, n=2.0, k=0.12),
    BodyShape("deep", a=64.0, b=50.0, n=2.0, k=0.12),
    BodyShape("boxy", a=72.0, b=33.0, n=3.5, k=0.0),
    BodyShape("rhomboid", a=70.0, b=46.0, n=1.35, k=0.0),
)
TAILS = (
    Tail("forked", "purple", (140, 50, 200)),
    Tail("rounded", "green", (40, 170, 60)),
    Tail("truncate", "orange", (245, 135, 20)),
    Tail("lanceolate", "brown", (120, 70, 30)),
)
# Genus: the 5 base patterns, then (combined variants) the pattern kinds with other counts and stripe widths, spots
# in one row, and vertical stripes crossed by a midline stripe.
PATTERN_VARIANTS = (
    Pattern("vertical", 3, "3 vertical stripes", 7.0),
    Pattern("horizontal", 2, "2 horizontal stripes", 7.0),
    Pattern("spots", 6, "6 dark spots", 8.0),
    Pattern("diagonal", 3, "3 diagonal stripes", 6.0),
    Pattern("band", 1, "1 broad horizontal band", 14.0),
    Pattern("vertical", 2, "2 vertical stripes", 7.0),
    Pattern("horizontal", 3, "3 thin horizontal stripes", 4.5),
    Pattern("spots", 4, "4 dark spots", 10.0),
    Pattern("diagonal", 2, "2 diagonal stripes", 6.0),
    Pattern("grid", 3, "3 vertical stripes crossed by a midline stripe", 5.0),
    Pattern("vertical", 1, "1 broad vertical bar", 12.0),
    Pattern("horizontal", 1, "1 thin horizontal stripe", 5.0),
    Pattern("spots", 2, "2 large dark spots", 12.0),
    Pattern("grid", 2, "2 vertical stripes crossed by a midline stripe", 5.0),
    Pattern("spots", 3, "3 dark spots in a row", 10.0),
    Pattern("vertical", 4, "4 thin vertical stripes", 5.0),
)
PATTERNS = PATTERN_VARIANTS[:5]
MARK_COLOURS = (
    ("yellow", (255, 215, 0)),
    ("cyan", (0, 215, 235)),
    ("magenta", (230, 40, 210)),
    ("white", (250, 250, 250)),
    ("lime", (150, 245, 40)),
    ("blue", (30, 70, 240)),
)
DISTRACTOR_COLOUR = (215, 20, 20)
STRIPE_COLOUR = (30, 30, 40)

# Combined variants, for forks with more siblings than base variants (sibling index >= the base count; the
# genus's are in PATTERN_VARIANTS).
# Order: every base shape with its height scaled (the body's aspect).
BODY_HEIGHTS = (0.8, 1.25, 1.5)
# Family: every tail shape with each other tail colour (the 4 base colours and 2 more).
TAIL_COLOURS = tuple((t.colour_name, t.colour) for t in TAILS) + (("pink", (240, 100, 160)), ("navy", (30, 40, 130)))
# Species: every mark colour with a centre dot of each other mark colour.


def _rotations(count: int) -> list[tuple[int, int]]:
    """(base, other) index pairs of two lists of `count` entries, every pair but (i, i), other = base + 1 first."""
    return [(i, (i + shift) % count) for shift in range(1, count) for i in range(count)]


# The variants of each rank's trait, by sibling index: the base variants first, unchanged.
BODY_VARIANTS = BODY_SHAPES + tuple(
    BodyShape(f"{s.name} (height x{f:g})", s.a, s.b * f, s.n, s.k) for f in BODY_HEIGHTS for s in BODY_SHAPES)
TAIL_VARIANTS = TAILS + tuple(
    Tail(TAILS[shape].shape, *TAIL_COLOURS[colour]) for shape, colour in _rotations(len(TAIL_COLOURS))
    if shape < len(TAILS))
MARK_VARIANTS = tuple(Mark(*c) for c in MARK_COLOURS) + tuple(
    Mark(*MARK_COLOURS[outer], *MARK_COLOURS[centre]) for outer, centre in _rotations(len(MARK_COLOURS)))
VARIANTS = {"order": BODY_VARIANTS, "family": TAIL_VARIANTS, "genus": PATTERN_VARIANTS, "species": MARK_VARIANTS}
# The most sibling taxa a fork of each rank can have: one trait variant each (the schema's maxima of data.synthetic).
MAX_SIBLINGS = {rank: len(variants) for rank, variants in VARIANTS.items()}

TRAIT_NAMES = {
    "order": "body shape",
    "family": "tail shape and colour",
    "genus": "flank pattern",
    "species": "mark colour",
}

# Canonical geometry (nominal px): body centred at the origin, head towards +x, y down.
MARK_RADIUS = 12.0  # species mark and distractor: 24 px across at 224 px
MARK_CENTRE_RADIUS = 6.0  # the centre dot of a combined species mark: a quarter of its area
TAIL_LENGTH = 34.0
TAIL_HALF_HEIGHT = 28.0
EYE_FROM_SNOUT = 13.0
OPERCULUM_FROM_SNOUT = 22.0
MARK_FROM_SNOUT = 35.0  # species mark centre, just behind the operculum
MARK_SPACING = 29.0  # species mark centre to distractor centre (5 px gap between the marks)
PATTERN_GAP = 5.0  # between the pattern region and the distractor
SCALE_RANGE = (0.8, 1.0)
MAX_ROTATION = 15.0

# Labels of the 2x raster.
BG, TAIL, FIN, BODY, OUTLINE, STRIPE, LINE, MARK, DISTRACT, EYE_WHITE, PUPIL, MARK_CENTRE = range(12)


# --------------------------------------------------------------------------------------------
# Taxonomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Species:
    """One leaf of the taxonomy and the sibling indices that pick its planted traits."""

    order: str
    family: str
    genus: str
    species: str
    order_idx: int
    family_idx: int
    genus_idx: int
    species_idx: int


def _letters(i: int, upper: bool) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr((65 if upper else 97) + r) + s
    return s


def build_taxonomy(n_orders: int = 2, families_per_order: int = 2, genera_per_family: int = 2,
                   species_per_genus: int = 2) -> list[Species]:
    """The balanced tree of taxa. Names: ``Ordo_A``, ``Familia_A1``, ``Genus_A1a``, ``Species_A1a_1``."""
    counts = {"order": n_orders, "family": families_per_order, "genus": genera_per_family,
              "species": species_per_genus}
    for rank, n in counts.items():
        limit = MAX_SIBLINGS[rank]
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"the number of taxa per parent at rank {rank} must be a positive integer, got {n!r}")
        if n > limit:
            raise ValueError(f"at most {limit} sibling taxa at rank {rank} (there are {limit} trait variants), got {n}")
    out = []
    for o in range(n_orders):
        oc = _letters(o, upper=True)
        for f in range(families_per_order):
            fc = f"{oc}{f + 1}"
            for g in range(genera_per_family):
                gc = f"{fc}{_letters(g, upper=False)}"
                for s in range(species_per_genus):
                    out.append(Species(f"Ordo_{oc}", f"Familia_{fc}", f"Genus_{gc}", f"Species_{gc}_{s + 1}",
                                       o, f, g, s))
    return out


def trait_table(taxonomy: list[Species]) -> pd.DataFrame:
    """The planted trait of every taxon: columns rank, taxon, trait, value, mask_key."""
    rows, seen = [], set()
    for rank in RANKS:
        for sp in taxonomy:
            taxon = getattr(sp, rank)
            if taxon in seen:
                continue
            seen.add(taxon)
            value = VARIANTS[rank][getattr(sp, f"{rank}_idx")].value
            rows.append({"rank": rank, "taxon": taxon, "trait": TRAIT_NAMES[rank], "value": value, "mask_key": rank})
    return pd.DataFrame(rows, columns=["rank", "taxon", "trait", "value", "mask_key"])


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _circle(cx: float, cy: float, r: float, m: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, m, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _tail_polygon(shape: str, x0: float) -> np.ndarray:
    L, H = TAIL_LENGTH, TAIL_HALF_HEIGHT
    if shape == "forked":
        pts = [(x0, -5), (x0 - L, -H), (x0 - 0.45 * L, 0), (x0 - L, H), (x0, 5)]
    elif shape == "rounded":
        r = 0.78 * H
        cx = x0 - L + r
        t = np.linspace(-0.5 * np.pi, -1.5 * np.pi, 24)
        arc = [(cx + r * math.cos(a), -r * math.sin(a)) for a in t]
        pts = [(x0, -5)] + arc + [(x0, 5)]
    elif shape == "truncate":
        pts = [(x0, -5), (x0 - 0.95 * L, -0.9 * H), (x0 - 0.95 * L, 0.9 * H), (x0, 5)]
    elif shape == "lanceolate":
        pts = [(x0, -6), (x0 - 0.55 * L, -0.62 * H), (x0 - 1.15 * L, 0), (x0 - 0.55 * L, 0.62 * H), (x0, 6)]
    else:  # pragma: no cover - guarded by TAILS
        raise ValueError(shape)
    return np.asarray(pts, dtype=float)


def _rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return np.asarray([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)


def _spread(lo: float, hi: float, n: int) -> np.ndarray:
    """`n` evenly spaced centres from `lo` to `hi` (one: the middle)."""
    return np.linspace(lo, hi, n) if n > 1 else np.array([(lo + hi) / 2])


def _pattern_polygons(pattern: Pattern, body: BodyShape, r0: float, r1: float) -> list[np.ndarray]:
    """Dark pattern shapes in canonical coordinates (clipped later to the region and the body)."""
    big = body.b + 20.0
    width = r1 - r0
    w = pattern.width
    midline = _rect(r0 - 5, r1 + 5, -w / 2, w / 2)
    if pattern.kind in ("vertical", "grid"):
        cs = _spread(r0 + w / 2 + 1, r1 - w / 2 - 1, pattern.count)
        bars = [_rect(c - w / 2, c + w / 2, -big, big) for c in cs]
        return bars + [midline] if pattern.kind == "grid" else bars
    if pattern.kind == "horizontal":
        c = 0.42 * body.b
        return [_rect(r0 - 5, r1 + 5, y - w / 2, y + w / 2) for y in _spread(-c, c, pattern.count)]
    if pattern.kind == "band":
        return [midline]
    if pattern.kind == "spots":  # an even count in two rows, an odd one in a row along the midline
        rows = 2 if pattern.count % 2 == 0 else 1
        polys = []
        for x in _spread(r0 + 7, r1 - 6, pattern.count // rows):
            hh = float(body.half_height(x))
            for y in (-0.45 * hh, 0.45 * hh) if rows == 2 else (0.0,):
                polys.append(_circle(x, y, w / 2, 20))
        return polys
    if pattern.kind == "diagonal":
        t = w / math.sqrt(2)
        polys = []
        for c in _spread(r0 + 0.15 * width, r1 - 0.15 * width, pattern.count):
            # 45 degree stripes: centre line x = c + y * tan(45)
            polys.append(np.asarray([(c - big - t, -big), (c - big + t, -big), (c + big + t, big),
                                     (c + big - t, big)], dtype=float))
        return polys
    raise ValueError(pattern.kind)  # pragma: no cover


def _outline_parts(body: BodyShape, tail: Tail) -> tuple[np.ndarray, ...]:
    """Canonical polygons (body, tail, dorsal fin, anal fin) of a fish with this body and tail."""
    a = body.a
    top = lambda x: -float(body.half_height(x))  # noqa: E731
    d0, d1 = -0.2 * a, 0.32 * a
    dorsal = np.asarray([(d0, top(d0) + 3), (d0 + 0.25 * (d1 - d0), top(d0 + 0.25 * (d1 - d0)) - 15),
                         (d1, top(d1) + 3)], dtype=float)
    a0, a1 = -0.62 * a, -0.3 * a
    anal = np.asarray([(a0, -top(a0) - 3), (a0 + 0.2 * (a1 - a0), -top(a0 + 0.2 * (a1 - a0)) + 11),
                       (a1, -top(a1) - 3)], dtype=float)
    return body.outline(), _tail_polygon(tail.shape, -a + 6.0), dorsal, anal


def fish_outline(body: BodyShape, tail: Tail) -> np.ndarray:
    """Every outline point of a fish with this body and tail (what its pose must keep in the frame)."""
    return np.concatenate(_outline_parts(body, tail))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A murky, low-contrast clutter of blobs and lines, drawn at half size, returned at 2x size."""
    base = np.array([rng.uniform(45, 105), rng.uniform(65, 120), rng.uniform(60, 125)])
    h = max(16, size // 2)
    f = h / NOMINAL
    img = Image.new("RGB", (h, h), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(14, 24))):
        cx, cy = rng.uniform(-5, h + 5, 2)
        rx, ry = rng.uniform(6, 40, 2) * f
        col = tuple(int(v) for v in np.clip(base + rng.uniform(-22, 22) + rng.uniform(-7, 7, 3), 0, 255))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
    for _ in range(int(rng.integers(5, 11))):
        p = rng.uniform(-10, h + 10, 4)
        col = tuple(int(v) for v in np.clip(base + rng.uniform(-26, 26) + rng.uniform(-7, 7, 3), 0, 255))
        draw.line([tuple(p[:2]), tuple(p[2:])], fill=col, width=int(rng.integers(1, 3)))
    return img.resize((size * SUPERSAMPLE, size * SUPERSAMPLE), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class _Pose:
    flipped: bool
    angle: float  # degrees
    scale: float  # relative to the nominal size at this image size
    tx: float
    ty: float


def _transform(pts: np.ndarray, pose: _Pose, unit: float) -> np.ndarray:
    """Canonical nominal px -> output px: flip, scale, rotate, translate."""
    p = np.asarray(pts, dtype=float) * unit * pose.scale
    if pose.flipped:
        p = p * np.array([-1.0, 1.0])
    th = math.radians(pose.angle)
    c, s = math.cos(th), math.sin(th)
    p = p @ np.array([[c, s], [-s, c]])
    return p + np.array([pose.tx, pose.ty])


def head_direction(flipped: bool, angle: float) -> np.ndarray:
    """Unit vector (x right, y down) from the body centre towards the head, in image pixels."""
    th = math.radians(angle)
    d = np.array([math.cos(th), math.sin(th)])
    return -d if flipped else d


def _poly(draw: ImageDraw.ImageDraw, pts: np.ndarray, fill: int, outline: int | None = None, width: int = 1) -> None:
    draw.polygon([tuple(p) for p in (pts * SUPERSAMPLE).tolist()], fill=fill, outline=outline, width=width)


def render_fish(order_idx: int, family_idx: int, genus_idx: int, species_idx: int, image_size: int = 224,
                rng: np.random.Generator | int | None = 0,
                pose_from: tuple[int, int] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Draw one fish with the given trait variants (sibling indices into `VARIANTS` of each rank).

    Returns the RGB image (uint8, H x W x 3), the masks (``MASK_KEYS`` -> bool H x W) and the
    pose (``flipped``, ``angle`` in degrees, ``scale`` relative to nominal, body centre ``cx``, ``cy``).
    pose_from: the (order_idx, family_idx) whose outline fits the fish in the frame (default its own): a
    counterfactual with another body or tail keeps the pose of its original (`counterfactual_fish`).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    body = BODY_VARIANTS[order_idx]
    tail = TAIL_VARIANTS[family_idx]
    pattern = PATTERN_VARIANTS[genus_idx]
    mark = MARK_VARIANTS[species_idx]
    size = int(image_size)
    unit = size / NOMINAL
    S2 = size * SUPERSAMPLE

    bg = _background(rng, size)

    # ---- canonical geometry
    a = body.a
    body_pts, tail_pts, dorsal, anal = _outline_parts(body, tail)
    top = lambda x: -float(body.half_height(x))  # noqa: E731
    xe = a - EYE_FROM_SNOUT
    ye = 0.3 * top(xe)
    xo = a - OPERCULUM_FROM_SNOUT
    ho = -top(xo)
    operc = np.asarray([(xo + 4.0 * (1 - (t / 0.75) ** 2), t * ho) for t in np.linspace(-0.75, 0.75, 13)])
    mouth = np.asarray([(a - 1.0, 0.18 * -top(a - 8)), (a - 8.0, 0.22 * -top(a - 8))])
    xs = a - MARK_FROM_SNOUT
    xd = xs - MARK_SPACING
    r0, r1 = -a + 7.0, xd - MARK_RADIUS - PATTERN_GAP
    region = _rect(r0, r1, -body.b - 20, body.b + 20)
    stripes = _pattern_polygons(pattern, body, r0, r1)

    # ---- pose: random flip, rotation, scale; translation keeps the whole fish in frame
    flipped = bool(rng.integers(0, 2))
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    scale = float(rng.uniform(*SCALE_RANGE))
    pose_order, pose_family = (order_idx, family_idx) if pose_from is None else pose_from
    outline_pts = fish_outline(BODY_VARIANTS[pose_order], TAIL_VARIANTS[pose_family])
    margin = 3.0 * unit
    for _ in range(8):
        ext = _transform(outline_pts, _Pose(flipped, angle, scale, 0.0, 0.0), unit)
        lo, hi = ext.min(0), ext.max(0)
        if np.all(hi - lo <= size - 2 * margin):
            break
        scale *= 0.95
    t_lo, t_hi = margin - lo, size - margin - hi
    t = np.where(t_hi > t_lo, t_lo + rng.uniform(0.0, 1.0, 2) * np.maximum(t_hi - t_lo, 0), (t_lo + t_hi) / 2)
    pose = _Pose(flipped, angle, scale, float(t[0]), float(t[1]))
    T = lambda p: _transform(p, pose, unit)  # noqa: E731
    px = unit * scale * SUPERSAMPLE  # one nominal px in 2x raster px

    # ---- label raster at 2x
    lab = Image.new("L", (S2, S2), BG)
    draw = ImageDraw.Draw(lab)
    _poly(draw, T(tail_pts), TAIL)
    _poly(draw, T(dorsal), FIN)
    _poly(draw, T(anal), FIN)
    _poly(draw, T(body_pts), BODY, OUTLINE, max(1, round(1.3 * px)))
    arr = np.array(lab)
    body_mask = (arr == BODY) | (arr == OUTLINE)

    reg = Image.new("L", (S2, S2), 0)
    rdraw = ImageDraw.Draw(reg)
    _poly(rdraw, T(region), 1)
    region_mask = (np.asarray(reg) > 0) & body_mask
    pat = Image.new("L", (S2, S2), 0)
    pdraw = ImageDraw.Draw(pat)
    for p in stripes:
        _poly(pdraw, T(p), 1)
    arr[(np.asarray(pat) > 0) & region_mask & (arr == BODY)] = STRIPE

    lab = Image.fromarray(arr)
    draw = ImageDraw.Draw(lab)
    draw.line([tuple(p) for p in (T(operc) * SUPERSAMPLE).tolist()], fill=LINE, width=max(1, round(1.6 * px)),
              joint="curve")
    draw.line([tuple(p) for p in (T(mouth) * SUPERSAMPLE).tolist()], fill=LINE, width=max(1, round(1.4 * px)))
    _poly(draw, T(_circle(xs, 0.0, MARK_RADIUS)), MARK)
    if mark.centre is not None:
        _poly(draw, T(_circle(xs, 0.0, MARK_CENTRE_RADIUS, 24)), MARK_CENTRE)
    _poly(draw, T(_circle(xd, 0.0, MARK_RADIUS)), DISTRACT)
    _poly(draw, T(_circle(xe, ye, 4.6, 24)), EYE_WHITE)
    _poly(draw, T(_circle(xe + 0.6, ye, 2.7, 20)), PUPIL)
    arr = np.asarray(lab)

    # ---- colours (per-image jitter only for the uninformative body colour)
    body_col = np.clip(np.array([182.0, 180.0, 170.0]) + rng.uniform(-14, 14) + rng.uniform(-6, 6, 3), 0, 255)
    lut = np.zeros((256, 3), np.uint8)
    lut[TAIL] = tail.colour
    lut[FIN] = body_col * 0.78
    lut[BODY] = body_col
    lut[OUTLINE] = body_col * 0.5
    lut[STRIPE] = STRIPE_COLOUR
    lut[LINE] = body_col * 0.55
    lut[MARK] = mark.colour
    if mark.centre is not None:
        lut[MARK_CENTRE] = mark.centre
    lut[DISTRACT] = DISTRACTOR_COLOUR
    lut[EYE_WHITE] = (235, 235, 230)
    lut[PUPIL] = (12, 12, 16)
    fish = Image.frombytes("P", (S2, S2), arr.tobytes())
    fish.putpalette(lut.tobytes())
    canvas = bg
    canvas.paste(fish.convert("RGB"), (0, 0), lab.point([0] + [255] * 255))
    small = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.int16)
    noise = np.rint(rng.standard_normal((size, size), dtype=np.float32) * 3.0).astype(np.int16)
    img = np.clip(small + noise[..., None], 0, 255).astype(np.uint8)

    def down(m: np.ndarray | Image.Image) -> np.ndarray:
        im = m if isinstance(m, Image.Image) else Image.fromarray(m.astype(np.uint8) * 255)
        return np.asarray(im.reduce(SUPERSAMPLE)) >= 128

    def label(*values: int) -> Image.Image:
        return lab.point([255 if i in values else 0 for i in range(256)])

    masks = {
        "order": down(body_mask),
        "family": down(label(TAIL)),
        "genus": down(region_mask),
        "species": down(label(MARK, MARK_CENTRE)),
        "distractor": down(label(DISTRACT)),
    }
    masks["family"] &= ~masks["order"]  # the tail is behind the body: boundary ties go to the body
    cx, cy = T(np.zeros((1, 2)))[0]
    info = {"flipped": flipped, "angle": round(angle, 3), "scale": round(scale, 4), "cx": float(cx), "cy": float(cy)}
    return img, masks, info


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image number `index` of a dataset generated with `seed`."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))


def image_index(image_id: str) -> int:
    """The generation index of a demo image from its id (``img<index>``, as `generate_dataset` names them)."""
    if not (str(image_id).startswith("img") and str(image_id)[3:].isdigit()):
        raise ValueError(f"{image_id!r} is not an image id of the synthetic generator (img<number>)")
    return int(str(image_id)[3:])


def swapped_sibling(sp: Species, rank: str, siblings: int) -> int:
    """The sibling index the counterfactual of `sp` takes at `rank`: the next of its `siblings` variants."""
    return (getattr(sp, f"{rank}_idx") + 1) % siblings


def counterfactual_fish(image_id: str, sp: Species, rank: str, sibling_idx: int, image_size: int = 224,
                        seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """The demo image `image_id` of species `sp` rendered again with exactly one trait, the one of `rank`, taken
    from the sibling of index `sibling_idx` (the species mark's colour, the genus pattern, the family tail or the
    order body shape): the same random stream, so the same background, pose, body colour and noise. Returns what
    `render_fish` returns; pixels change only where the trait was or now is (for the body shape: the whole fish)."""
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    traits = {r: getattr(sp, f"{r}_idx") for r in RANKS}
    traits[rank] = int(sibling_idx)
    return render_fish(traits["order"], traits["family"], traits["genus"], traits["species"], image_size,
                       image_rng(seed, image_index(image_id)), pose_from=(sp.order_idx, sp.family_idx))


MANIFEST_COLUMNS = ("image_id", "path", "split", "order", "family", "genus", "species", "mask_path", "flipped",
                    "angle", "scale")


def _render_job(job: tuple) -> dict:
    index, image_id, split, sp, image_size, seed, out_dir = job
    img, masks, info = render_fish(sp.order_idx, sp.family_idx, sp.genus_idx, sp.species_idx, image_size,
                                   image_rng(seed, index))
    rel = f"images/{split}/{sp.species}/{image_id}.png"
    mrel = f"masks/{image_id}.npz"
    Image.fromarray(img).save(Path(out_dir) / rel, format="PNG", compress_level=1)
    save_masks(Path(out_dir) / mrel, masks)
    return {"image_id": image_id, "path": rel, "split": split, "order": sp.order, "family": sp.family,
            "genus": sp.genus, "species": sp.species, "mask_path": mrel, "flipped": info["flipped"],
            "angle": info["angle"], "scale": info["scale"]}


def generate_dataset(out_dir: str | os.PathLike, n_orders: int = 2, families_per_order: int = 2,
                     genera_per_family: int = 2, species_per_genus: int = 2, n_train: int = 120, n_val: int = 20,
                     n_test: int = 20, image_size: int = 224, seed: int = 0, progress: bool = True,
                     workers: int = 1) -> Path:
    """Write the synthetic dataset under ``out_dir`` (see the module doc) and return the path of its manifest.csv.

    ``n_train``/``n_val``/``n_test`` are images per species; a split with 0 images is omitted.
    Images are rendered by ``workers`` processes and their manifest rows written as they come (memory does not
    grow with the number of images). Files already in ``out_dir`` are overwritten, never deleted.
    """
    if int(seed) < 0:
        raise ValueError("seed must be non-negative")
    if image_size < 32:
        raise ValueError("image_size must be at least 32")
    per_split = dict(zip(SPLITS, (n_train, n_val, n_test)))
    for name, n in zip(("n_train", "n_val", "n_test"), per_split.values()):
        if n < 0:
            raise ValueError(f"{name} must be >= 0")
    out = Path(out_dir)
    taxonomy = build_taxonomy(n_orders, families_per_order, genera_per_family, species_per_genus)
    for split, n in per_split.items():
        if n:
            for sp in taxonomy:
                (out / "images" / split / sp.species).mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    tax = pd.DataFrame([{r: getattr(sp, r) for r in RANKS} for sp in taxonomy], columns=list(RANKS))
    tax.to_csv(out / "taxonomy.csv", index=False, lineterminator="\n")
    trait_table(taxonomy).to_csv(out / "traits.csv", index=False, lineterminator="\n")

    def jobs():
        index = 0
        for split, n in per_split.items():
            for sp in taxonomy:
                for _ in range(n):
                    yield index, f"img{index:06d}", split, sp, int(image_size), int(seed), str(out)
                    index += 1

    total = len(taxonomy) * sum(per_split.values())
    if workers is None or workers <= 0:
        workers = os.cpu_count() or 1
    workers = min(workers, max(total, 1))
    partial = out / "manifest.csv.partial"  # renamed when complete: no truncated manifest after a failure
    with open(partial, "w", newline="") as f, contextlib.ExitStack() as stack:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        if workers == 1:
            rows = map(_render_job, jobs())
        else:
            import multiprocessing as mp

            # imap feeds the jobs lazily (a pipe's worth ahead) and yields the rows in order
            rows = stack.enter_context(mp.get_context().Pool(workers)).imap(_render_job, jobs(), chunksize=16)
        for row in tqdm(rows, total=total, desc="synthetic images", unit="img", disable=not progress):
            writer.writerow(row)
    return partial.replace(out / "manifest.csv")


# --------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------

OUTLINE_COLOURS = {"order": (255, 255, 255), "family": (255, 120, 0), "genus": (0, 255, 120),
                   "species": (0, 160, 255), "distractor": (255, 0, 255)}


def _boundary(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def contact_sheet(out_dir: str | os.PathLike, dest: str | os.PathLike, split: str = "test", per_species: int = 1,
                  outlines: bool = True, columns: int | None = None) -> Path:
    """A grid PNG of ``per_species`` images of every species, with mask outlines and species names."""
    out = Path(out_dir)
    man = pd.read_csv(out / "manifest.csv")
    man = man[man["split"] == split].groupby("species", sort=False).head(per_species)
    tiles = []
    for row in man.itertuples():
        img = np.array(Image.open(out / row.path).convert("RGB"))
        raw = img.copy()
        if outlines:
            for key, m in load_masks(out / row.mask_path).items():
                img[_boundary(m)] = OUTLINE_COLOURS.get(key, (255, 255, 255))
        tile = np.concatenate([raw, img], axis=1)
        t = Image.fromarray(tile)
        ImageDraw.Draw(t).text((3, 2), row.species, fill=(255, 255, 255))
        tiles.append(t)
    if not tiles:
        raise ValueError(f"no images in split {split!r}")
    w, h = tiles[0].size
    cols = columns or max(1, int(math.ceil(math.sqrt(len(tiles)))))
    rows_n = int(math.ceil(len(tiles) / cols))
    sheet = Image.new("RGB", (cols * (w + 4), rows_n * (h + 4)), (0, 0, 0))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * (w + 4), (i // cols) * (h + 4)))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest)
    return dest


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m taxotrait.synthetic",
                                 description="Generate the synthetic fish taxonomy with planted traits and masks.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-orders", type=int, default=2)
    ap.add_argument("--families-per-order", type=int, default=2)
    ap.add_argument("--genera-per-family", type=int, default=2)
    ap.add_argument("--species-per-genus", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=120, help="training images per species")
    ap.add_argument("--n-val", type=int, default=20, help="validation images per species")
    ap.add_argument("--n-test", type=int, default=20, help="test images per species")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=1, help="processes (0 = all cores); output does not depend on it")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--contact-sheet", metavar="PNG", help="also write a contact sheet of the test split here")
    args = ap.parse_args(argv)
    manifest = generate_dataset(args.out_dir, n_orders=args.n_orders, families_per_order=args.families_per_order,
                           genera_per_family=args.genera_per_family, species_per_genus=args.species_per_genus,
                           n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, image_size=args.image_size,
                           seed=args.seed, progress=not args.no_progress, workers=args.workers)
    if args.contact_sheet:
        contact_sheet(args.out_dir, args.contact_sheet, split="test" if args.n_test else "train")
    species = pd.read_csv(manifest, usecols=["species"])["species"]
    print(f"wrote {len(species)} images of {species.nunique()} species to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
