"""Localization metrics on hand-computed cases, ground truth in the eval crop (masks, CUB-style keypoints), part
consistency and named traits."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import heads_table
from taxotrait.evaluation import class_trait_heads, stratified_order, trait_head_masks
from taxotrait.methods import combine_heads
from taxotrait.groundtruth import (BACKGROUND, KEYPOINTS, GroundTruth, crop_mask, crop_points, keypoint_mask,
                                   load_ground_truth, save_masks)
from taxotrait.localization import energy_shares, head_peak_parts, normalise_maps, part_consistency, pointing_hits
from taxotrait.traits import describe_traits, name_heads, rank_traits


def square_mask(size=10, y0=2, y1=5, x0=3, x1=7):
    mask = np.zeros((1, size, size), dtype=bool)
    mask[0, y0:y1, x0:x1] = True
    return mask


def test_pointing_game_peak_inside_scores_one_outside_zero():
    mask = square_mask()
    inside = np.zeros((1, 10, 10))
    inside[0, 3, 4] = 1.0
    outside = np.zeros((1, 10, 10))
    outside[0, 8, 8] = 1.0
    assert pointing_hits(inside, mask).tolist() == [1.0]
    assert pointing_hits(outside, mask).tolist() == [0.0]
    tie = np.zeros((1, 10, 10))
    tie[0, 0, 9] = tie[0, 3, 4] = 1.0  # ties go to the first pixel in raster order: (0, 9), outside
    assert pointing_hits(tie, mask).tolist() == [0.0]


def test_energy_game_uniform_map_scores_the_area_share():
    mask = square_mask()
    assert energy_shares(np.ones((1, 10, 10)), mask)[0] == pytest.approx(12 / 100)
    assert energy_shares(mask.astype(float) * 3, mask)[0] == pytest.approx(1.0)
    assert energy_shares(np.zeros((1, 10, 10)), mask)[0] == 0.0
    assert energy_shares(-np.ones((1, 10, 10)), mask)[0] == 0.0  # negative mass is clipped
    assert normalise_maps(np.full((1, 2, 2), 5.0)).tolist() == [[[1.0, 1.0], [1.0, 1.0]]]  # stays uniform
    assert normalise_maps(np.array([[[1.0, 3.0]]])).tolist() == [[[0.0, 1.0]]]


def test_crop_mask_and_points_follow_the_eval_crop():
    # 240 x 240 image, resize 240, crop 224: the crop starts 8 px in
    mask = np.zeros((240, 240), dtype=bool)
    mask[8, 8] = mask[100, 50] = True
    cropped = crop_mask(mask, 240, 224)
    assert cropped.shape == (224, 224) and cropped[0, 0] and cropped[92, 42] and cropped.sum() == 2
    assert crop_points(np.array([[50.5, 100.5]]), 240, 240, 240, 224).tolist() == [[42.5, 92.5]]
    # 224 x 224 image resized to 240: a point maps consistently with the mask
    mask = np.zeros((224, 224), dtype=bool)
    mask[100:110, 60:70] = True
    cropped = crop_mask(mask, 240, 224)
    x, y = crop_points(np.array([[65.0, 105.0]]), 224, 224, 240, 224)[0]
    assert cropped[int(y), int(x)]
    assert cropped.sum() == pytest.approx(100 * (240 / 224) ** 2, rel=0.25)


def test_part_at_takes_the_most_specific_mask_or_the_nearest_keypoint():
    body = np.zeros((20, 20), dtype=bool)
    body[2:18, 2:18] = True
    mark = np.zeros((20, 20), dtype=bool)
    mark[5:8, 5:8] = True
    gt = GroundTruth(masks={"order": body, "species": mark})
    assert gt.part_at(6.5, 6.5) == "species"  # inside both: the smaller mask
    assert gt.part_at(15.0, 15.0) == "order"
    assert gt.part_at(0.5, 0.5) == BACKGROUND
    points = GroundTruth(points={"crown": (10.0, 2.0), "belly": (10.0, 15.0)})
    assert points.part_at(9.0, 4.0) == "crown" and points.part_at(3.0, 12.0) == "belly"
    assert GroundTruth().part_at(1, 1) == ""
    strict, near, disc = points.targets(20, 2.0, (4, 4))[KEYPOINTS]
    assert disc[2, 10] and disc[15, 10] and not disc[8, 10] and (near == disc).all()
    assert strict.sum() == 2 * 25 and strict[0:5, 10:15].all() and strict[15:20, 10:15].all()  # the 5 px patches
    strict, near, area = gt.targets(20, 2.0, (4, 4))["species"]
    assert (strict == mark).all() and (area == mark).all()
    assert near[3, 6] and near[6, 9] and not near[2, 6] and not near[10, 10] and near.sum() > mark.sum()
    assert keypoint_mask(np.array([[0.5, 0.5]]), 4, 1.0).sum() == 3  # pixel centres within 1 px of (0.5, 0.5)


def test_part_consistency_threshold():
    rows = []
    for i in range(5):
        rows.append(("T", 0, f"i{i}", "species" if i < 4 else "order"))  # 4/5 = 0.8: consistent
        rows.append(("T", 1, f"i{i}", "species" if i < 3 else "genus"))  # 3/5: not
        rows.append(("T", 2, f"i{i}", BACKGROUND))  # always the background: not a part
    table = part_consistency(pd.DataFrame(rows, columns=["taxon", "head", "image_id", "part"]), 0.8).set_index("head")
    assert table["consistent"].tolist() == [True, False, False]
    assert table.loc[0, "part"] == "species" and table.loc[0, "share"] == pytest.approx(0.8)
    assert table.loc[1, "share"] == pytest.approx(0.6) and (table["n_images"] == 5).all()


def trait_heads(rows, rank="species"):
    """rows: (image_id, taxon, head, trait, peak_x, peak_y)"""
    return heads_table(rows, ["image_id", "taxon", "head", "is_trait_head", "peak_x", "peak_y"], rank=rank,
                       margin_before_removal=1.0, margin_after_removal=0.5)


def test_named_traits_from_nested_masks(tmp_path):
    body = np.zeros((240, 240), dtype=bool)
    body[40:200, 40:200] = True
    mark = np.zeros((240, 240), dtype=bool)
    mark[60:90, 60:90] = True
    manifest = []
    for i in range(3):
        save_masks(tmp_path / f"m{i}.npz", {"order": body, "species": mark})
        manifest.append((f"i{i}", str(tmp_path / f"m{i}.npz")))
    manifest = pd.DataFrame(manifest, columns=["image_id", "mask_path"])
    # crop pixel = original - 8; (68, 68) crop -> (76, 76) original: in the mark; (150, 150) -> body only
    mark_xy, body_xy = 68 / 224, 150 / 224
    heads = trait_heads([
        ("i0", "S", 0, True, mark_xy, mark_xy), ("i0", "S", 1, True, body_xy, body_xy),
        ("i1", "S", 0, True, mark_xy, mark_xy), ("i1", "S", 1, False, 0.01, 0.01),
        ("i2", "S", 0, True, body_xy, body_xy), ("i2", "S", 1, True, 0.01, 0.01),
    ])
    named = name_heads(heads, manifest, 240, 224)
    # every head of the image's own prompt is named, a trait head or not (the key places traits there)
    assert named["part"].tolist() == ["species", "order", "species", BACKGROUND, "order", BACKGROUND]
    traits = rank_traits(named).set_index("head")
    assert traits.loc[0, "part"] == "species" and traits.loc[0, "part_share"] == pytest.approx(2 / 3)
    assert traits.loc[1, "part_share"] == pytest.approx(0.5)  # order once, background once: tie -> by name
    assert traits.loc[1, "part"] == BACKGROUND
    assert describe_traits(rank_traits(named), "S").startswith("S: head 0: species (67%), head 1: background (50%)")
    plain = rank_traits(heads)  # without ground truth
    assert (plain["part"] == "").all() and plain["part_share"].isna().all() and plain.dtypes["part"] == "string"
    assert describe_traits(plain, "S").startswith("S: head 0: centre of the image, spread 0.10 (100% of images)")
    empty = rank_traits(named.iloc[:0])  # no trait head at all (no correctly classified image): same columns
    assert empty.empty and list(empty.columns) == list(plain.columns)


@pytest.fixture
def cub(tmp_path):
    """A hand-made CUB-style folder: images.txt, parts/parts.txt, parts/part_locs.txt and two 300 x 200 images."""
    root = tmp_path / "CUB"
    (root / "images" / "001.Oriole").mkdir(parents=True)
    (root / "parts").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (300, 200), (90, 90, 90)).save(root / "images" / "001.Oriole" / name)
    (root / "images.txt").write_text("1 001.Oriole/a.jpg\n2 001.Oriole/b.jpg\n")
    (root / "parts" / "parts.txt").write_text("1 back\n2 beak\n3 crown\n4 left eye\n")
    (root / "parts" / "part_locs.txt").write_text(
        "1 1 150.0 150.0 1\n1 2 0.0 0.0 0\n1 3 150.0 50.0 1\n1 4 10.0 100.0 1\n"  # left eye: outside the crop
        "2 1 0.0 0.0 0\n2 2 0.0 0.0 0\n2 3 160.0 60.0 1\n2 4 0.0 0.0 0\n")
    manifest = pd.DataFrame({"image_id": ["x1", "x2"], "path": [str(root / "images" / "001.Oriole" / n)
                                                                for n in ("a.jpg", "b.jpg")]})
    return root, manifest


def test_cub_keypoints_in_the_crop(cub):
    root, manifest = cub
    # 300 x 200 -> resize 240: 360 x 240, crop 224: left 68, top 8; scale 1.2
    truth = load_ground_truth(manifest, 240, 224, parts=root)
    assert set(truth) == {"x1", "x2"}
    assert truth["x1"].points == {"back": pytest.approx((112.0, 172.0)), "crown": pytest.approx((112.0, 52.0))}
    assert list(truth["x2"].points) == ["crown"]
    assert load_ground_truth(manifest, 240, 224, parts=root / "parts").keys() == truth.keys()
    # without images.txt the manifest's image_id is the annotation's image id
    by_id = manifest.assign(image_id=["1", "2"])
    (root / "images.txt").unlink()
    assert load_ground_truth(by_id, 240, 224, parts=root)["1"].points == truth["x1"].points
    # pointing 8 px below the crown keypoint hits within the tolerance but not in the keypoint's 14 px patch (row 3);
    # a far peak misses both
    strict, target, _ = truth["x1"].targets(224, 15.0, (16, 16))[KEYPOINTS]
    near, far = np.zeros((2, 224, 224))
    near[60, 115] = 1.0
    far[200, 10] = 1.0
    assert pointing_hits(np.stack([near, far]), np.stack([target, target])).tolist() == [1.0, 0.0]
    assert pointing_hits(np.stack([near, far]), np.stack([strict, strict])).tolist() == [0.0, 0.0]
    near[50, 115] = 2.0  # in the crown's patch
    assert pointing_hits(near[None], strict[None]).tolist() == [1.0]


def test_named_traits_from_keypoints(cub):
    root, manifest = cub
    heads = trait_heads([("x1", "Scott Oriole", 1, True, 112 / 224, 56 / 224),
                         ("x2", "Scott Oriole", 1, True, 120 / 224, 70 / 224),
                         ("x1", "Scott Oriole", 11, True, 110 / 224, 170 / 224),
                         ("x2", "Scott Oriole", 11, True, 0.5, 0.9)])
    named = name_heads(heads, manifest, 240, 224, parts=root)
    assert named["part"].tolist() == ["crown", "crown", "back", "crown"]  # x2 has only the crown visible
    text = describe_traits(rank_traits(named), "Scott Oriole")
    assert text == "Scott Oriole: head 1: crown (100%), head 11: back (50%)"
    parts = head_peak_parts(heads.iloc[:1], load_ground_truth(manifest, 240, 224, parts=root), 224)
    assert parts.tolist() == ["crown"]


def test_stratified_order_and_trait_heads():
    assert stratified_order(["a", "a", "b", "b", "c", "a"]).tolist() == [0, 2, 4, 1, 3, 5]
    heads = trait_heads([("i0", "A", 0, True, 0.5, 0.5), ("i0", "A", 1, False, 0.5, 0.5),
                         ("i1", "A", 0, False, 0.5, 0.5), ("i1", "A", 1, True, 0.5, 0.5),
                         ("i2", "A", 0, True, 0.5, 0.5), ("i2", "A", 1, False, 0.5, 0.5)])
    by_class = class_trait_heads(heads, ["A", "B"], 2)
    assert by_class.tolist() == [[True, False], [True, True]]  # head 0 on 2/3 images; B: no data -> all heads
    true_heads, predicted = trait_head_masks(["i1", "i9"], np.array([0, 0]), np.array([0, 1]), heads, ["A", "B"], 2)
    assert true_heads.tolist() == [[False, True], [True, False]]  # own heads; misclassified: the class's
    assert predicted.tolist() == [[False, True], [True, True]]
    maps = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0)])[None]
    assert combine_heads(maps, np.array([[True, True]]))[0, 0, 0] == pytest.approx(2.0)
    assert combine_heads(maps, np.array([[False, True]]))[0, 0, 0] == pytest.approx(3.0)
