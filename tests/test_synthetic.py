"""Validity of the synthetic fish taxonomy: determinism, tree, files, masks, planted traits, pose."""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from taxotrait import synthetic as syn
from taxotrait.config import SYNTHETIC_BRANCHING, validate_config
from taxotrait.errors import ConfigError
from taxotrait.groundtruth import load_masks, save_masks
from taxotrait.schema import SCHEMA, load_schema, with_defaults

SIZE = 128
REPO = Path(__file__).resolve().parents[1]
# forks wider than the base variants (4 body shapes, 4 tails, 5 patterns, 6 mark colours)
WIDE = dict(n_orders=2, families_per_order=6, genera_per_family=1, species_per_genus=12)
WIDE_SEED = 5


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    manifest = syn.generate_dataset(out, n_train=3, n_val=1, n_test=1, image_size=SIZE, seed=7, progress=False)
    return out, pd.read_csv(manifest)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    out = tmp_path_factory.mktemp("wide")
    manifest = syn.generate_dataset(out, **WIDE, n_train=1, n_val=0, n_test=0, image_size=SIZE, seed=WIDE_SEED,
                                    progress=False)
    return out, pd.read_csv(manifest)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _erode(m: np.ndarray, n: int = 1) -> np.ndarray:
    for _ in range(n):
        p = np.pad(m, 1)
        m = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def _dilate(m: np.ndarray, n: int = 1) -> np.ndarray:
    for _ in range(n):
        p = np.pad(m, 1)
        m = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return m


def _centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.mean(), ys.mean()])


def _indices(ds_dir: Path) -> dict[str, dict[str, int]]:
    """taxon -> sibling index (position among its parent's children), from traits.csv values."""
    traits = pd.read_csv(ds_dir / "traits.csv")
    lookup = {rank: [v.value for v in variants] for rank, variants in syn.VARIANTS.items()}
    return {rank: {r.taxon: lookup[rank].index(r.value) for r in traits[traits["rank"] == rank].itertuples()}
            for rank in syn.RANKS}


def _images(ds_dir: Path, man: pd.DataFrame):
    for row in man.itertuples():
        img = np.asarray(Image.open(ds_dir / row.path).convert("RGB")).astype(float)
        yield row, img, load_masks(ds_dir / row.mask_path)


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(tmp_path):
    kw = dict(n_train=2, n_val=1, n_test=0, image_size=64, progress=False)
    a = pd.read_csv(syn.generate_dataset(tmp_path / "a", seed=3, workers=1, **kw))
    syn.generate_dataset(tmp_path / "b", seed=3, workers=2, **kw)
    syn.generate_dataset(tmp_path / "c", seed=4, workers=1, **kw)
    fa, fb, fc = (_files(tmp_path / d) for d in "abc")
    assert len(fa) == 3 + 2 * len(a)  # 3 CSVs, an image and a mask per row
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    assert fa.keys() == fc.keys()
    differ = [k for k in fa if fa[k] != fc[k]]
    assert {k for k in fa if k.endswith(".csv") and k != "manifest.csv"}.isdisjoint(differ)  # same taxonomy
    assert sum(k.endswith(".png") for k in differ) == len(a)
    assert sum(k.endswith(".npz") for k in differ) == len(a)


# ------------------------------------------------------------------------------------------ taxonomy


def test_taxonomy_is_a_tree_with_requested_counts(tmp_path):
    man = pd.read_csv(syn.generate_dataset(tmp_path, n_orders=3, families_per_order=2, genera_per_family=1,
                                           species_per_genus=3, n_train=1, n_val=0, n_test=2, image_size=48,
                                           progress=False))
    tax = pd.read_csv(tmp_path / "taxonomy.csv")
    assert list(tax.columns) == ["order", "family", "genus", "species"]
    assert len(tax) == 18 and tax["species"].is_unique
    assert [tax[r].nunique() for r in syn.RANKS] == [3, 6, 6, 18]
    for parent, child in zip(syn.RANKS, syn.RANKS[1:]):
        assert (tax.groupby(child)[parent].nunique() == 1).all(), f"a {child} with two {parent}s"
        assert (tax.groupby(parent)[child].nunique() == {"family": 2, "genus": 1, "species": 3}[child]).all()
    names = [n for r in syn.RANKS for n in tax[r].unique()]
    assert len(names) == len(set(names)), "a name used at two ranks"

    traits = pd.read_csv(tmp_path / "traits.csv")
    assert list(traits.columns) == ["rank", "taxon", "trait", "value", "mask_key"]
    assert len(traits) == 3 + 6 + 6 + 18 and traits["taxon"].is_unique
    assert set(traits["taxon"]) == set(names)
    assert (traits["mask_key"] == traits["rank"]).all()
    vals = traits.set_index("taxon")["value"]
    for parent, child in zip(syn.RANKS, syn.RANKS[1:]):  # sibling taxa carry distinct trait values
        sibs = tax.drop_duplicates(child).groupby(parent)[child].apply(lambda s: vals[list(s)].nunique() == len(s))
        assert sibs.all()
    assert vals[tax["order"].unique()].nunique() == 3

    assert sorted(man["split"].unique()) == ["test", "train"]  # the empty val split is omitted
    counts = man.groupby(["split", "species"]).size()
    assert len(counts) == 2 * 18 and (counts.loc["train"] == 1).all() and (counts.loc["test"] == 2).all()
    assert set(man["species"]) == set(tax["species"])
    merged = man.merge(tax, on="species", suffixes=("", "_tax"))
    for r in ("order", "family", "genus"):
        assert (merged[r] == merged[f"{r}_tax"]).all()


def _sibling_groups(tax: pd.DataFrame):
    """(rank, the taxa of one fork at that rank) of every fork of the taxonomy table, the root's orders included."""
    yield "order", list(tax["order"].unique())
    for parent, child in zip(syn.RANKS, syn.RANKS[1:]):
        for _, sibs in tax.drop_duplicates(child).groupby(parent)[child]:
            yield child, list(sibs)


def test_ten_thousand_species_have_distinct_sibling_traits_at_every_fork():
    taxonomy = syn.build_taxonomy(10, 10, 10, 12)
    tax = pd.DataFrame([{r: getattr(sp, r) for r in syn.RANKS} for sp in taxonomy])
    traits = syn.trait_table(taxonomy)
    assert len(tax) == 12_000 and tax["species"].is_unique and traits["taxon"].is_unique
    assert len(traits) == 10 + 100 + 1000 + 12_000
    values = traits.set_index("taxon")["value"]
    forks = 0
    for rank, sibs in _sibling_groups(tax):
        assert values[sibs].nunique() == len(sibs), f"{rank} siblings {sibs} share a trait value"
        forks += 1
    assert forks == 1 + 10 + 100 + 1000
    # the same index among siblings is the same variant whatever the fork's width
    assert syn.trait_table(syn.build_taxonomy(1, 1, 1, 7)).iloc[-1]["value"] == values["Species_A1a_7"]


def test_too_many_siblings_is_an_error():
    with pytest.raises(ValueError, match="at most 36 sibling taxa at rank species"):
        syn.build_taxonomy(species_per_genus=syn.MAX_SIBLINGS["species"] + 1)
    with pytest.raises(ValueError):
        syn.build_taxonomy(n_orders=0)
    syn.build_taxonomy(*syn.MAX_SIBLINGS.values())  # the largest forks are fine


def test_schema_maxima_are_the_trait_variants():
    """Start-up rejects a fork the generator cannot draw: a config error naming the key and its largest value."""
    branches = load_schema()["properties"]["data"]["properties"]["synthetic"]["oneOf"]
    keys = next(b["properties"] for b in branches if b.get("type") == "object")
    for rank, key in SYNTHETIC_BRANCHING:
        assert keys[key]["maximum"] == syn.MAX_SIBLINGS[rank] == len(syn.VARIANTS[rank])
        config = with_defaults({"data": {"synthetic": {key: syn.MAX_SIBLINGS[rank]}}})
        validate_config(config, SCHEMA)
        config["data"]["synthetic"][key] += 1
        with pytest.raises(ConfigError, match=rf"data\.synthetic\.{key}: .* maximum of {syn.MAX_SIBLINGS[rank]}"):
            validate_config(config, SCHEMA)


# ------------------------------------------------------------------------------------------ files


def test_manifest_paths_exist_and_decode(ds):
    out, man = ds
    assert list(man.columns[:8]) == ["image_id", "path", "split", "order", "family", "genus", "species",
                                     "mask_path"]
    on_disk = pd.read_csv(out / "manifest.csv")
    assert on_disk[["image_id", "path", "species"]].equals(man[["image_id", "path", "species"]])
    assert man["image_id"].is_unique and len(man) == 16 * 5
    assert man.groupby("split").size().to_dict() == {"train": 48, "val": 16, "test": 16}
    for row in man.itertuples():
        assert row.path == f"images/{row.split}/{row.species}/{row.image_id}.png"
        with Image.open(out / row.path) as im:
            im.load()
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        assert (out / row.mask_path).is_file()
    pngs = {str(p.relative_to(out)) for p in (out / "images").rglob("*.png")}
    assert pngs == set(man["path"])


def _check_masks(name: str, img: np.ndarray, m: dict[str, np.ndarray]) -> None:
    """The masks of one image: every key, the image's shape, not empty, nested and disjoint as documented."""
    assert tuple(m) == syn.MASK_KEYS
    for k, v in m.items():
        assert v.dtype == bool and v.shape == img.shape[:2], k
        assert v.sum() >= 10, f"{name}: empty {k} mask"
    body = _dilate(m["order"], 1)
    for k in ("species", "distractor", "genus"):
        assert not (m[k] & ~body).any(), f"{name}: {k} outside the body"
    assert not (m["species"] & m["distractor"]).any()
    assert not (m["genus"] & (m["species"] | m["distractor"])).any()
    assert not (m["family"] & m["order"]).any()
    assert (m["family"] & _dilate(m["order"], 2)).any(), "tail not attached to the body"
    # ~24 px marks at 224 px: area pi * 12^2 * (size/224)^2 * scale^2, scale in [0.8, 1]
    nominal = math.pi * (12 * img.shape[0] / 224) ** 2
    for k in ("species", "distractor"):
        assert 0.5 * nominal < m[k].sum() < 1.2 * nominal, (name, k)
    assert abs(m["species"].sum() - m["distractor"].sum()) <= 0.15 * m["species"].sum()


def test_masks_shapes_nonempty_and_nested(ds):
    out, man = ds
    for row, img, m in _images(out, man):
        _check_masks(row.image_id, img, m)


def test_load_masks_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    masks = {k: rng.random((5, 7)) > 0.5 for k in syn.MASK_KEYS}
    save_masks(tmp_path / "m.npz", masks)
    back = load_masks(tmp_path / "m.npz")
    assert list(back) == list(masks)
    assert all(np.array_equal(back[k], masks[k]) and back[k].dtype == bool for k in masks)
    with np.load(tmp_path / "m.npz") as z:  # a plain .npz
        assert z["species"].shape == (5, 7)


# ------------------------------------------------------------------------------------------ planted traits


def _check_planted_colours(name: str, img: np.ndarray, m: dict[str, np.ndarray], family_idx: int,
                           species_idx: int) -> None:
    """The tail's colour, the species mark's colour (its rim) and centre dot's (its middle), the red distractor, in
    the pixels of their masks; the mark's colours nowhere else on the fish."""
    mark = syn.MARK_VARIANTS[species_idx]
    inside = _erode(m["species"])
    ys, xs = np.indices(m["species"].shape)
    cx, cy = _centroid(m["species"])
    radius = math.sqrt(m["species"].sum() / math.pi)
    distance = np.hypot(xs - cx, ys - cy)
    rim, middle = inside & (distance > 0.65 * radius), inside & (distance < 0.3 * radius)
    assert np.abs(np.median(img[rim], 0) - mark.colour).max() < 30, (name, mark.value)
    assert np.abs(np.median(img[middle], 0) - (mark.centre or mark.colour)).max() < 30, (name, mark.value)
    if mark.centre is None:
        assert np.abs(img[inside].mean(0) - mark.colour).max() < 20, name
    red = img[_erode(m["distractor"])].mean(0)
    assert np.abs(red - syn.DISTRACTOR_COLOUR).max() < 20, (name, red)
    tail = img[_erode(m["family"])].mean(0)
    assert np.abs(tail - syn.TAIL_VARIANTS[family_idx].colour).max() < 25, (name, tail)
    rest = _erode(m["order"] & ~_dilate(m["species"] | m["distractor"], 1))
    for colour in {mark.colour, mark.centre or mark.colour}:
        assert (np.abs(img[rest] - colour).max(1) < 40).mean() < 0.01, name


def test_planted_colours_are_in_the_pixels(ds):
    out, man = ds
    idx = _indices(out)
    means = {}
    for row, img, m in _images(out, man):
        _check_planted_colours(row.image_id, img, m, idx["family"][row.family], idx["species"][row.species])
        means.setdefault(row.species, []).append(img[_erode(m["species"])].mean(0))
    tax = pd.read_csv(out / "taxonomy.csv")
    for _, sibs in tax.groupby("genus")["species"]:
        a, b = (np.mean(means[s], 0) for s in sibs)
        assert np.linalg.norm(a - b) > 100, "sibling species marks look alike"


def _dark(img: np.ndarray) -> np.ndarray:
    """Stripe-dark pixels (stripes, pupil); the body outline and the operculum line are lighter."""
    return img.max(-1) < 70


def _runs(values: np.ndarray) -> int:
    v = np.concatenate([[False], values, [False]]).astype(int)
    return int((np.diff(v) == 1).sum())


def test_planted_shape_and_pattern(ds):
    """Order: body aspect ratio; genus: stripe runs along the body axis, in the pose of the manifest."""
    out, man = ds
    idx = _indices(out)
    values = pd.read_csv(out / "traits.csv").set_index("taxon")["value"]
    aspects = {0: [], 1: []}
    for row, img, m in _images(out, man):
        o, g = idx["order"][row.order], idx["genus"][row.genus]
        h = syn.head_direction(row.flipped, row.angle)
        n = np.array([-h[1], h[0]])
        ys, xs = np.nonzero(m["order"])
        pts = np.stack([xs, ys], 1) - _centroid(m["order"])
        aspects[o].append(np.ptp(pts @ h) / np.ptp(pts @ n))

        dark = _dark(img) & m["genus"]
        region = _erode(m["order"]) & m["genus"]
        assert 0.1 < dark.sum() / m["genus"].sum() < 0.8, "no pattern in the genus region"
        plain = _erode(m["order"] & ~m["genus"] & ~m["species"] & ~m["distractor"], 2)
        assert _dark(img)[plain].mean() < 0.05, "dark pattern outside the genus region"  # the pupil only
        # sample the midline of the body (along the head direction) inside the genus region
        c = _centroid(m["order"])
        t = np.arange(-SIZE, SIZE, 0.25)
        p = np.rint(c + t[:, None] * h).astype(int)
        ok = (p >= 0).all(1) & (p < SIZE).all(1)
        p = p[ok]
        inside = region[p[:, 1], p[:, 0]]
        along = _runs(_dark(img)[p[:, 1], p[:, 0]] & inside)
        # ... and across the body through the middle of the genus region
        q = np.rint(_centroid(m["genus"]) + t[:, None] * n).astype(int)
        q = q[(q >= 0).all(1) & (q < SIZE).all(1)]
        across = _runs(_dark(img)[q[:, 1], q[:, 0]] & region[q[:, 1], q[:, 0]])
        count, kind = values[row.genus].split()[:2]  # e.g. "3 vertical stripes"
        if kind == "vertical":
            assert along == int(count), (row.image_id, along)
        else:
            assert kind == "horizontal"
            assert along == 0, (row.image_id, along)  # horizontal stripes do not cross the midline
            assert across == int(count), (row.image_id, across)
    assert min(aspects[0]) > 2.4 and max(aspects[1]) < 1.6, aspects


def test_pose_is_applied_to_image_and_masks_alike(ds):
    out, man = ds
    idx = _indices(out)
    assert man["flipped"].any() and (~man["flipped"]).any()
    assert man["angle"].abs().max() <= 15 and man["angle"].abs().max() > 5
    for row, img, m in _images(out, man):
        h = syn.head_direction(row.flipped, row.angle)
        cb = _centroid(m["order"])
        proj = lambda mask: float((_centroid(mask) - cb) @ h)  # noqa: E731
        # masks: mark behind the head, distractor mid-body, tail at the back
        assert proj(m["species"]) > 0.05 * SIZE
        assert proj(m["species"]) > proj(m["distractor"]) + 0.07 * SIZE
        assert proj(m["family"]) < -0.2 * SIZE
        # image: the same places, found from the pixels alone
        sp = idx["species"][row.species]
        mark_px = np.abs(img - syn.MARK_COLOURS[sp][1]).max(-1) < 30
        fam_px = np.abs(img - syn.TAILS[idx["family"][row.family]].colour).max(-1) < 30
        assert np.linalg.norm(_centroid(mark_px) - _centroid(m["species"])) < 2
        assert np.linalg.norm(_centroid(fam_px & _dilate(m["family"], 3)) - _centroid(m["family"])) < 2
        # the eye (the darkest blob on the body outside the stripes) is in front of the mark
        cand = _erode(m["order"], 1) & ~_dilate(m["genus"], 1)
        ys, xs = np.nonzero(cand)
        darkest = np.argsort(img[ys, xs].sum(-1))[:3]
        eye = np.array([xs[darkest].mean(), ys[darkest].mean()])
        assert float((eye - cb) @ h) > proj(m["species"]) + 2, row.image_id


# ------------------------------------------------------------------------------------------ CLI, sheet


def test_cli_and_contact_sheet(tmp_path):
    rc = syn.main([str(tmp_path / "d"), "--seed", "1", "--n-train", "1", "--n-val", "0", "--n-test", "1",
                   "--image-size", "64", "--species-per-genus", "1", "--no-progress",
                   "--contact-sheet", str(tmp_path / "sheet.png")])
    assert rc == 0
    man = pd.read_csv(tmp_path / "d" / "manifest.csv")
    assert len(man) == 8 * 2 and man["species"].nunique() == 8
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size[0] >= 2 * 64 and im.size[1] >= 64


# ------------------------------------------------------------------------------------------ counterfactuals
# how far (pixels at 128 px) a swap may reach beyond the masks of the trait before and after: the boundary pixels
# partly covered at 2x (1), the tail sliding under the body's outline (2), the fins that follow the body (in no mask)
COUNTERFACTUAL_REACH = {"species": (("species",), 1), "genus": (("genus",), 1), "family": (("family",), 2),
                        "order": (("order", "family"), 10)}


def _check_counterfactuals(out: Path, rows: pd.DataFrame, taxonomy: list, rank: str, siblings: int, seed: int):
    """Each image rendered again with the rank's trait of its next sibling: the same pixels everywhere but where the
    trait was or now is; the same trait index reproduces the generated file byte for byte."""
    by_name = {sp.species: sp for sp in taxonomy}
    keys, reach = COUNTERFACTUAL_REACH[rank]
    for row in rows.itertuples():
        sp = by_name[row.species]
        original = np.asarray(Image.open(out / row.path).convert("RGB"))
        size = original.shape[0]
        same, same_masks, _ = syn.counterfactual_fish(row.image_id, sp, rank, getattr(sp, f"{rank}_idx"), size, seed)
        assert (same == original).all()
        swap = syn.swapped_sibling(sp, rank, siblings)
        assert swap != getattr(sp, f"{rank}_idx") and 0 <= swap < siblings
        image, masks, _ = syn.counterfactual_fish(row.image_id, sp, rank, swap, size, seed)
        changed = (image != original).any(-1)
        region = np.any([masks[k] | same_masks[k] for k in keys], axis=0)
        assert changed.sum() > 0.3 * masks[rank].sum()  # the trait did change
        assert not (changed & ~_dilate(region, reach)).any(), row.image_id
        if rank != "order":  # the body and the other traits' masks stay where they were
            assert all((masks[k] == same_masks[k]).all() for k in syn.MASK_KEYS if k != rank)


@pytest.mark.parametrize("rank", syn.RANKS)
def test_counterfactual_changes_only_the_swapped_trait(ds, rank):
    out, man = ds
    taxonomy = syn.build_taxonomy()
    _check_counterfactuals(out, man[man["split"] == "test"], taxonomy, rank, 2, 7)
    with pytest.raises(ValueError, match="not an image id of the synthetic generator"):
        syn.counterfactual_fish("photo_1", taxonomy[0], rank, 0)


# ------------------------------------------------------------------------------------------ wide forks


def test_wide_forks_generate_with_their_planted_traits(wide):
    """More families and species per parent than base variants: the tree, distinct sibling traits at every fork,
    correct masks and the planted colours of the combined variants in the pixels."""
    out, man = wide
    tax = pd.read_csv(out / "taxonomy.csv")
    assert [tax[r].nunique() for r in syn.RANKS] == [2, 12, 12, 144] and len(man) == 144
    values = pd.read_csv(out / "traits.csv").set_index("taxon")["value"]
    for rank, sibs in _sibling_groups(tax):
        assert values[sibs].nunique() == len(sibs), f"{rank} siblings {sibs} share a trait value"
    idx = _indices(out)
    assert max(idx["family"].values()) == 5 and max(idx["species"].values()) == 11
    for row, img, m in _images(out, man):
        _check_masks(row.image_id, img, m)
        _check_planted_colours(row.image_id, img, m, idx["family"][row.family], idx["species"][row.species])


@pytest.mark.parametrize("rank", ["family", "species"])
def test_wide_fork_counterfactuals(wide, rank):
    """The counterfactual of every sibling of one wide fork, the last one's wrapping round to the first."""
    out, man = wide
    key = dict(SYNTHETIC_BRANCHING)[rank]
    parent = syn.RANKS[syn.RANKS.index(rank) - 1]
    first = man[man[parent] == man[parent].iloc[0]].drop_duplicates(rank)
    assert len(first) == WIDE[key]
    _check_counterfactuals(out, first, syn.build_taxonomy(**WIDE), rank, WIDE[key], WIDE_SEED)


@pytest.mark.parametrize("rank", syn.RANKS)
def test_every_variant_differs_from_its_siblings_in_its_own_trait_only(rank):
    """Every variant of the rank's trait, up to the widest fork, drawn on the same fish (same random stream and
    pose): valid masks and planted colours; any two differ in the trait's region and nowhere else (the body
    shape: also the tail and fins it carries), by at least a tenth of the trait's mask."""
    renders = []
    for i in range(syn.MAX_SIBLINGS[rank]):
        traits = {r: 1 for r in syn.RANKS} | {rank: i}
        img, masks, _ = syn.render_fish(*traits.values(), SIZE, 11, pose_from=(1, 1))
        _check_masks(f"{rank} {i}", img, masks)
        _check_planted_colours(f"{rank} {i}", img, masks, traits["family"], traits["species"])
        renders.append((img, masks))
    keys, reach = COUNTERFACTUAL_REACH[rank]
    for (a, (img_a, m_a)), (b, (img_b, m_b)) in itertools.combinations(enumerate(renders), 2):
        changed = (img_a != img_b).any(-1)
        region = np.any([m_a[k] | m_b[k] for k in keys], axis=0)
        assert not (changed & ~_dilate(region, reach)).any(), (rank, a, b)
        assert changed.sum() > 0.05 * min(m_a[rank].sum(), m_b[rank].sum()), (rank, a, b)
        if rank == "order":  # another silhouette, not the same one moved
            assert (m_a["order"] & m_b["order"]).sum() < 0.95 * (m_a["order"] | m_b["order"]).sum(), (a, b)


# ------------------------------------------------------------------------------------------ the demo's bytes


def test_the_demo_images_are_unchanged():
    """The first training image of every species of the demo (config/config.yaml), pixels and masks: their digest
    was taken from the generator before forks could outgrow the base variants (the README's numbers are of them)."""
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["data"]["synthetic"]
    taxonomy = syn.build_taxonomy(demo["n_orders"], demo["families_per_order"], demo["genera_per_family"],
                                  demo["species_per_genus"])
    assert syn.trait_table(taxonomy)["value"].tolist()[:8] == [
        "elongated", "deep", "forked purple", "rounded green", "forked purple", "rounded green",
        "3 vertical stripes", "2 horizontal stripes"]
    digest = hashlib.sha256()
    for k, sp in enumerate(taxonomy):
        img, masks, _ = syn.render_fish(sp.order_idx, sp.family_idx, sp.genus_idx, sp.species_idx,
                                        demo["image_size"], syn.image_rng(demo["seed"], k * demo["n_train"]))
        digest.update(img.tobytes())
        for key, mask in masks.items():
            digest.update(key.encode())
            digest.update(mask.tobytes())
    assert digest.hexdigest() == "f2cb2a1347fc8a1abb768b77d5dcf872e7cc451b5796f276f61f8404c4cb2d3b"
