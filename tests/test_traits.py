"""Trait tables and the pointing game on hand-computed cases."""

import numpy as np
import pandas as pd
import pytest

from conftest import heads_table
from taxotrait.extract import map_statistics
from taxotrait.groundtruth import exclusive_masks
from taxotrait.localization import box_hits, patch_boxes, pointing_game, top_trait_heads
from taxotrait.traits import hierarchy_traits, rank_traits, top_traits


def rank_heads(rows):
    """rows: (image_id, taxon, head, step, before, after, trait, peak_x, peak_y)"""
    return heads_table(rows, ["image_id", "taxon", "head", "removal_step", "score_before_removal",
                              "score_after_removal", "is_trait_head", "peak_x", "peak_y"], rank="genus")


HEADS = rank_heads([
    ("i1", "G1", 0, 0, 5.0, 4.5, False, 0.1, 0.1), ("i1", "G1", 1, 1, 4.5, 2.0, True, 0.5, 0.25),
    ("i2", "G1", 0, 1, 6.0, 3.0, True, 0.3, 0.3), ("i2", "G1", 1, 0, 7.0, 6.0, False, 0.9, 0.9),
    ("i3", "G1", 0, 0, 3.0, 2.9, False, 0.2, 0.2), ("i3", "G1", 1, 1, 2.9, 0.9, True, 0.7, 0.75),
    ("i4", "G2", 0, 1, 1.0, 0.0, True, 0.5, 0.5), ("i4", "G2", 1, 0, 1.5, 1.0, False, 0.5, 0.5),
])


def test_rank_traits_aggregate_per_taxon_and_head():
    traits = rank_traits(HEADS)
    g1 = traits[traits["taxon"] == "G1"].set_index("head")
    assert g1.loc[1, "n_images"] == 2 and g1.loc[1, "frequency"] == pytest.approx(2 / 3)
    assert g1.loc[1, "mean_importance"] == pytest.approx((2.5 + 2.0) / 2)
    assert g1.loc[1, "peak_x"] == pytest.approx(0.6) and g1.loc[1, "peak_y"] == pytest.approx(0.5)
    assert g1.loc[0, "n_images"] == 1 and g1.loc[0, "frequency"] == pytest.approx(1 / 3)
    assert traits["taxon"].tolist() == ["G1", "G1", "G2"]  # most frequent first within a taxon
    assert top_traits(traits, "G1", 1)["head"].tolist() == [1]
    assert traits.dtypes["n_images"] == "int64"


def test_hierarchy_measures_each_species_on_its_own_images():
    manifest = pd.DataFrame({"image_id": ["i1", "i2", "i3", "i4"], "species": ["S1", "S1", "S2", "S3"]})
    table = hierarchy_traits([HEADS], manifest, ["genus", "species"])
    s1 = table[table["species"] == "S1"].set_index("head")
    assert set(s1.index) == {0, 1} and (s1["frequency"] == 0.5).all()
    assert table[table["species"] == "S2"]["head"].tolist() == [1]


def test_map_statistics_peak_and_spread():
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 2] = 1.0  # a point: peak at its centre, no spread
    maps[1] = 1.0 / 16  # uniform: spread = RMS distance of the grid from its centre
    px, py, spread = map_statistics(maps)
    assert (px[0], py[0], spread[0]) == (pytest.approx(0.625), pytest.approx(0.375), pytest.approx(0.0))
    centres = (np.arange(4) + 0.5) / 4
    expected = np.sqrt(2 * np.mean((centres - 0.5) ** 2))
    assert spread[1] == pytest.approx(expected)


def test_patch_boxes_undo_the_eval_crop():
    # 240x240 image, resize 240, crop 224 -> offset 8 px, patches of 56 px on a 4x4 grid
    boxes = patch_boxes((4, 4), 240, 240, 240, 224)
    assert boxes[0].tolist() == [8, 8, 64, 64] and boxes[5].tolist() == [64, 64, 120, 120]
    # a 120x120 image is upscaled 2x first: boxes shrink by 2
    assert patch_boxes((4, 4), 120, 120, 240, 224)[0].tolist() == [4, 4, 32, 32]
    mask = np.zeros((240, 240), bool)
    mask[100:110, 70:75] = True
    assert box_hits(mask, boxes).nonzero()[0].tolist() == [5]


def test_pointing_game_hits_and_random_baseline(tmp_path):
    mask = np.zeros((240, 240), bool)
    mask[64:120, 64:120] = True  # exactly patch (row 1, col 1)
    heads = rank_heads([
        ("a", "S", 0, 1, 1.0, 0.0, True, 0.375, 0.375), ("a", "S", 1, 0, 1.0, 1.0, False, 0.9, 0.9),
        ("b", "S", 0, 0, 1.0, 1.0, False, 0.375, 0.375), ("b", "S", 1, 1, 1.0, 0.0, True, 0.9, 0.9),
    ])
    assert top_trait_heads(heads)["head"].tolist() == [0, 1]
    manifest = pd.DataFrame({"image_id": ["a", "b"], "mask_path": ["m", "m"]})
    table = pointing_game(heads, manifest, lambda path: {"spot": mask, "all": np.ones_like(mask)}, (4, 4), 240, 224)
    assert table.groupby("region").size().to_dict() == {"planted": 2, "exclusive": 2}
    rows = table.set_index(["region", "mask"])
    for region in ("planted", "exclusive"):
        assert rows.loc[(region, "spot"), "hit_rate"] == 0.5
        assert rows.loc[(region, "spot"), "random_rate"] == pytest.approx(1 / 16)
    assert rows.loc[("planted", "all"), "hit_rate"] == 1.0 and rows.loc[("planted", "all"), "n_images"] == 2
    # the spot is inside `all`: its exclusive region loses the spot's patch, where image a peaks
    assert rows.loc[("exclusive", "all"), "hit_rate"] == 0.5
    assert rows.loc[("exclusive", "all"), "random_rate"] == pytest.approx(15 / 16)
    # several ranks at once (the summary): each rank scored as alone, each image's masks read once for all of them
    species = heads.assign(rank="species", peak_x=1 - heads["peak_x"], contrast="siblings")
    reads = []
    both = pointing_game(pd.concat([heads, species], ignore_index=True), manifest,
                         lambda path: reads.append(path) or {"spot": mask, "all": np.ones_like(mask)}, (4, 4), 240, 224)
    assert reads == ["m"] and both["rank"].tolist() == ["genus"] * 4 + ["species"] * 4
    pd.testing.assert_frame_equal(both[both["rank"] == "genus"], table)
    alone = pointing_game(species, manifest, lambda path: {"spot": mask, "all": np.ones_like(mask)}, (4, 4), 240, 224)
    pd.testing.assert_frame_equal(both[both["rank"] == "species"].reset_index(drop=True), alone)
    assert set(alone["contrast"]) == {"siblings"} and alone.set_index(["region", "mask"]).loc[
        ("planted", "spot"), "hit_rate"] == 0.0  # mirrored peaks miss the spot


def test_exclusive_masks_give_each_pixel_to_the_smallest_mask():
    body = np.zeros((6, 6), bool)
    body[1:5, 1:5] = True
    mark = np.zeros_like(body)
    mark[2, 2] = True
    tail = np.zeros_like(body)
    tail[4:6, 4:6] = True  # overlaps the body in one pixel: the smaller tail gets it
    regions = exclusive_masks({"body": body, "mark": mark, "tail": tail})
    assert list(regions) == ["body", "mark", "tail"]
    assert regions["mark"].sum() == 1 and regions["tail"].sum() == 4
    assert regions["body"].sum() == 16 - 1 - 1 and not regions["body"][2, 2] and not regions["body"][4, 4]
    assert not (regions["body"] & regions["mark"]).any() and not (regions["body"] & regions["tail"]).any()
