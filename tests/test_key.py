"""The key as couplets (`taxotrait.traits.key_entries`, `key_table`, `key_markdown`) on hand-built heads tables whose
heads fire where and how strongly the test says."""

import re

import numpy as np
import pandas as pd
import pytest

from conftest import heads_table
from taxotrait.traits import KEY_ENTRY_COLUMNS, ROOT, key_entries, key_markdown, key_on_rank_traits, key_table

IMAGES = 8  # per child


def fork_heads(firing: dict, seed: int = 0) -> pd.DataFrame:
    """heads.parquet rows of a two-child fork A / B (rank species), every image scored with both prompts' heads:
    `firing[(prompt, head)]` = ((strength on A's images, peak there), (strength on B's images, peak there)); a
    strength gets noise of sd 0.05, each row is named after the region its peak is in."""
    rng = np.random.default_rng(seed)
    rows = []
    for taxon in ("A", "B"):
        for i in range(IMAGES):
            for (prompt, head), sides in firing.items():
                strength, (x, y), part = sides[taxon == "B"]
                rows.append((f"{taxon}{i}", taxon, prompt, head, strength + rng.normal(0, 0.05), x, y, part,
                             head == 0 and prompt == taxon))
    columns = ["image_id", "taxon", "prompt", "head", "score_drop_alone", "peak_x", "peak_y", "part",
               "is_trait_head"]
    frame = pd.DataFrame(rows, columns=columns)
    named = heads_table(frame.drop(columns="part").values.tolist(), [c for c in columns if c != "part"],
                        contrast="siblings")
    return named.assign(part=frame["part"].astype("string"))


MARK, WANDER, SHARED = ((0.2, 0.2), "species"), ((0.8, 0.8), "background"), ((0.5, 0.9), "distractor")


def test_an_absent_trait_is_placed_where_its_head_fires_on_the_siblings_images():
    """Head 0 of A's prompt finds A's mark (fires 1.0 on A's images, at the mark) and wanders on B's (fires 0.0,
    at the other corner): A's present entry and B's absent one, both placed at the mark, with the strengths of
    each side; B's own head 0 fires alike on both sides and is no entry."""
    heads = fork_heads({("A", 0): ((1.0, *MARK), (0.0, *WANDER)),
                        ("B", 0): ((0.3, *WANDER), (0.3, *WANDER))})
    entries = key_entries(heads).set_index(["taxon", "entry"])
    a, b = entries.loc[("A", 1)], entries.loc[("B", 1)]
    assert (a["evidence"], a["prompt"], a["head"]) == ("present", "A", 0)
    assert (b["evidence"], b["prompt"], b["head"]) == ("absent", "A", 0)
    for entry in (a, b):  # where the head fires on A's images, never where it wanders on B's
        assert (entry["peak_x"], entry["peak_y"]) == pytest.approx((0.2, 0.2))
        assert (entry["part"], entry["part_share"]) == ("species", 1.0)
        assert entry["strength_with"] == pytest.approx(1.0, abs=0.05)
        assert entry["strength_without"] == pytest.approx(0.0, abs=0.05)
        assert entry["separation_low"] > 0.8 and entry["n_images_with"] == entry["n_images_without"] == IMAGES
    assert len(entries) == 2  # B's own head (alike on both sides) is not an entry of either child


def test_a_head_that_fires_equally_on_both_children_is_never_an_entry():
    """The demo's distractor: every fish carries it, so head 1 of either prompt fires on it alike on A's and B's
    images, more strongly than any other head and as a trait head on every image; it is no entry. The weaker head 0
    that fires on B's mark only is B's entry; A is told apart by its absence."""
    heads = fork_heads({("A", 1): ((2.0, *SHARED), (2.0, *SHARED)), ("B", 1): ((2.0, *SHARED), (2.0, *SHARED)),
                        ("B", 0): ((0.1, *WANDER), (0.6, *MARK)), ("A", 0): ((0.2, *WANDER), (0.2, *WANDER))})
    heads.loc[heads["head"] == 1, "is_trait_head"] = True
    entries = key_entries(heads)
    assert not (entries["head"] == 1).any() and not (entries["part"] == "distractor").any()
    best = entries[entries["entry"] == 1].set_index("taxon")
    assert best.loc["B", ["evidence", "prompt", "part"]].tolist() == ["present", "B", "species"]
    assert best.loc["A", ["evidence", "prompt", "part"]].tolist() == ["absent", "B", "species"]
    assert best.loc["A", "strength_with"] == pytest.approx(0.6, abs=0.05)  # on B's images
    assert best.loc["A", "strength_without"] == pytest.approx(0.1, abs=0.05)  # on A's own


def test_a_fork_whose_heads_all_fire_alike_has_no_entry_and_the_key_says_so():
    heads = fork_heads({("A", 0): ((0.5, *MARK), (0.5, *WANDER)), ("B", 0): ((0.3, *WANDER), (0.3, *WANDER))})
    entries = key_entries(heads)
    assert entries.empty and list(entries.columns) == list(KEY_ENTRY_COLUMNS)
    classes = pd.DataFrame({"rank": "species", "class_index": [0, 1], "taxon": ["A", "B"], "parent": "Genus"})
    text = key_markdown(key_table([entries], classes, ["species"]), classes, ["species"])
    assert text.count("no head tells it apart") == 2


def test_entries_are_ranked_by_separation_not_by_how_often_they_survive_masking():
    heads = fork_heads({("A", 0): ((0.5, *WANDER), (0.2, *WANDER)), ("A", 1): ((1.5, *MARK), (0.1, *WANDER))})
    heads.loc[heads["head"] == 1, "is_trait_head"] = False  # head 0 is the trait head on every image
    a = key_entries(heads).query("taxon == 'A'").sort_values("entry")
    assert a["head"].tolist() == [1, 0] and a["separation"].is_monotonic_decreasing
    assert a["frequency"].tolist() == [0.0, 1.0]


def test_the_key_reads_as_couplets_and_counts_entries_on_the_rank_traits():
    heads = fork_heads({("A", 0): ((1.0, *MARK), (0.0, *WANDER)), ("B", 1): ((0.0, *SHARED), (1.5, *SHARED))})
    classes = pd.DataFrame({"rank": "species", "class_index": [0, 1], "taxon": ["A", "B"], "parent": "Genus"})
    key = key_table([key_entries(heads)], classes, ["species"])
    assert key["node"].unique().tolist() == ["Genus"] and (key["n_children"] == 2).all()
    text = key_markdown(key, classes, ["species"])
    assert "## Genus → A vs B (species)" in text
    assert re.search(r"- \*\*A\*\*: absent: head 1 of B's prompt, distractor region on B's images \(100%\); .*; present: head 0, species region \(100%\); fires \d\.\d\d with, -?\d\.\d\d without "
                     r"\(separation \d\.\d\d \[\d\.\d\d, \d\.\d\d\]\)", text)
    # the fork's best couplet: B's head on the distractor (present in B, absent in A), then A's head on the mark
    assert "- **B**: present: head 1, distractor region (100%)" in text
    assert "absent: head 0 of A's prompt, species region on A's images (100%)" in text
    on_trait = key_on_rank_traits(key, ["species"])
    assert on_trait[["rank", "n_taxa", "on_trait"]].values.tolist() == [["species", 2, 0]]
    assert "species 0/2; 0 of 2" in text


def test_under_contrast_rank_the_own_trait_heads_are_the_entries():
    """No sibling prompt is scored (the paper's set-up): each taxon's trait heads, present, no separation."""
    heads = fork_heads({("A", 0): ((1.0, *MARK), (0.0, *WANDER)), ("B", 0): ((0.0, *WANDER), (1.0, *MARK))})
    heads = heads[heads["prompt"] == heads["taxon"]].assign(contrast="rank")
    entries = key_entries(heads)
    assert entries[["taxon", "evidence", "head"]].values.tolist() == [["A", "present", 0], ["B", "present", 0]]
    assert entries["separation"].isna().all() and (entries["frequency"] == 1.0).all()
    classes = pd.DataFrame({"rank": "order", "class_index": [0, 1], "taxon": ["A", "B"], "parent": None})
    text = key_markdown(key_table([entries.assign(rank="order")], classes, ["order"]), classes, ["order"])
    assert f"## {ROOT} → A vs B (order)" in text and "a trait head on 100% of images" in text
