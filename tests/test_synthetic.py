"""Validity of the synthetic fish taxonomy: determinism, tree, files, masks, planted traits, pose."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from taxotrait import synthetic as syn
from taxotrait.groundtruth import load_masks, save_masks

SIZE = 128


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    man = syn.generate_dataset(out, n_train=3, n_val=1, n_test=1, image_size=SIZE, seed=7, progress=False)
    return out, man


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
    lookup = {
        "order": [b.name for b in syn.BODY_SHAPES],
        "family": [t.value for t in syn.TAILS],
        "genus": [p.value for p in syn.PATTERNS],
        "species": [f"{name} mark" for name, _ in syn.MARK_COLOURS],
    }
    return {rank: {r.taxon: lookup[rank].index(r.value) for r in traits[traits["rank"] == rank].itertuples()}
            for rank in syn.RANKS}


def _images(ds_dir: Path, man: pd.DataFrame):
    for row in man.itertuples():
        img = np.asarray(Image.open(ds_dir / row.path).convert("RGB")).astype(float)
        yield row, img, load_masks(ds_dir / row.mask_path)


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(tmp_path):
    kw = dict(n_train=2, n_val=1, n_test=0, image_size=64, progress=False)
    a = syn.generate_dataset(tmp_path / "a", seed=3, workers=1, **kw)
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
    man = syn.generate_dataset(tmp_path, n_orders=3, families_per_order=2, genera_per_family=1,
                               species_per_genus=3, n_train=1, n_val=0, n_test=2, image_size=48, progress=False)
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


def test_too_many_siblings_is_an_error():
    with pytest.raises(ValueError, match="rank species"):
        syn.build_taxonomy(species_per_genus=len(syn.MARK_COLOURS) + 1)
    with pytest.raises(ValueError):
        syn.build_taxonomy(n_orders=0)


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


def test_masks_shapes_nonempty_and_nested(ds):
    out, man = ds
    for row, img, m in _images(out, man):
        assert tuple(m) == syn.MASK_KEYS
        for k, v in m.items():
            assert v.dtype == bool and v.shape == img.shape[:2], k
            assert v.sum() >= 10, f"{row.image_id}: empty {k} mask"
        body = _dilate(m["order"], 1)
        for k in ("species", "distractor", "genus"):
            assert not (m[k] & ~body).any(), f"{row.image_id}: {k} outside the body"
        assert not (m["species"] & m["distractor"]).any()
        assert not (m["genus"] & (m["species"] | m["distractor"])).any()
        assert not (m["family"] & m["order"]).any()
        assert (m["family"] & _dilate(m["order"], 2)).any(), "tail not attached to the body"
        # ~24 px marks at 224 px: area pi * 12^2 * (size/224)^2 * scale^2, scale in [0.8, 1]
        nominal = math.pi * (12 * SIZE / 224) ** 2
        for k in ("species", "distractor"):
            assert 0.5 * nominal < m[k].sum() < 1.2 * nominal
        assert abs(m["species"].sum() - m["distractor"].sum()) <= 0.15 * m["species"].sum()


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


def test_planted_colours_are_in_the_pixels(ds):
    out, man = ds
    idx = _indices(out)
    means = {}
    for row, img, m in _images(out, man):
        sp = idx["species"][row.species]
        fam = idx["family"][row.family]
        mark = img[_erode(m["species"])].mean(0)
        assert np.abs(mark - syn.MARK_COLOURS[sp][1]).max() < 20, (row.image_id, mark)
        red = img[_erode(m["distractor"])].mean(0)
        assert np.abs(red - syn.DISTRACTOR_COLOUR).max() < 20, (row.image_id, red)
        tail = img[_erode(m["family"])].mean(0)
        assert np.abs(tail - syn.TAILS[fam].colour).max() < 25, (row.image_id, tail)
        # the marks' colours are nowhere else on the fish
        rest = _erode(m["order"] & ~_dilate(m["species"] | m["distractor"], 1))
        assert (np.abs(img[rest] - syn.MARK_COLOURS[sp][1]).max(1) < 40).mean() < 0.01
        means.setdefault(row.species, []).append(mark)
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


@pytest.mark.parametrize("rank", syn.RANKS)
def test_counterfactual_changes_only_the_swapped_trait(ds, rank):
    """The test image rendered again with the rank's trait of a sibling: the same pixels everywhere but where the
    trait was or now is; the same trait index reproduces the generated file byte for byte."""
    out, man = ds
    taxonomy = {sp.species: sp for sp in syn.build_taxonomy()}
    keys, reach = COUNTERFACTUAL_REACH[rank]
    for row in man[man["split"] == "test"].itertuples():
        sp = taxonomy[row.species]
        original = np.asarray(Image.open(out / row.path).convert("RGB"))
        same, same_masks, _ = syn.counterfactual_fish(row.image_id, sp, rank, getattr(sp, f"{rank}_idx"), SIZE, 7)
        assert (same == original).all()
        image, masks, _ = syn.counterfactual_fish(row.image_id, sp, rank, syn.swapped_sibling(sp, rank, 2), SIZE, 7)
        changed = (image != original).any(-1)
        region = np.any([masks[k] | same_masks[k] for k in keys], axis=0)
        assert changed.sum() > 0.3 * masks[rank].sum()  # the trait did change
        assert not (changed & ~_dilate(region, reach)).any(), row.image_id
        if rank != "order":  # the body and the other traits' masks stay where they were
            assert all((masks[k] == same_masks[k]).all() for k in syn.MASK_KEYS if k != rank)
    with pytest.raises(ValueError, match="not an image id of the synthetic generator"):
        syn.counterfactual_fish("photo_1", sp, rank, 0)
