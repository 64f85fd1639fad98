"""What `snakemake --report` shows: category order, figure labels, the tables' HTML pages and legible figures."""

import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from taxotrait import evaluation, report
from taxotrait.figures import new_figure, save_figure
from taxotrait.io import empty_table
from taxotrait.localization import POINTING_COLUMNS
from taxotrait.methods import METHODS
from taxotrait.summary import summary_text

RANKS = ["order", "family", "genus", "species"]


class Tables(HTMLParser):
    """The text of every table cell, per table, and the class of every list item."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.items, self.cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "li":
            self.items.append(dict(attrs).get("class"))

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None


def test_categories_and_ranks_sort_in_their_order():
    shuffled = [report.category(name) for name in reversed(report.CATEGORIES)]
    assert sorted(shuffled) == [report.category(name) for name in report.CATEGORIES]  # the report sorts by name
    ranks = [f"rank{i}" for i in range(12, 0, -1)]  # 12 ranks: zero-padded, "10." would sort before "2." otherwise
    assert [report.rank_subcategory(r, ranks) for r in ranks][:2] == ["01. rank12", "02. rank11"]
    assert sorted(report.rank_subcategory(r, ranks) for r in reversed(ranks)) == [
        report.rank_subcategory(r, ranks) for r in ranks]
    with pytest.raises(ValueError, match="'kingdom' is not one of"):
        report.rank_subcategory("kingdom", RANKS)


def test_summary_page_shows_the_tables_and_the_settings():
    test = pd.DataFrame({"rank": RANKS, "top1": [1.0, 0.95, 0.9, 0.5], "top5": 1.0, "n_images": 320,
                         "contrast": "rank", "sibling_top1": 1.0, "top_down_top1": [1.0, 0.9, 0.8, 0.4]})
    assert "## Targets" not in summary_text(test, empty_table(POINTING_COLUMNS), RANKS)  # no ground truth, no targets
    own = [(rank, mask, "exclusive", 0.9 if mask == rank else 0.05) for rank in RANKS for mask in RANKS]
    pointing = pd.DataFrame(own, columns=["rank", "mask", "region", "tolerance_hit_rate"]).assign(
        hit_rate=0.5, random_rate=0.1, tolerance_random_rate=0.2, centre_rate=lambda t: t["tolerance_hit_rate"])
    key_on_trait = pd.DataFrame({"rank": RANKS, "n_taxa": [2, 4, 8, 16], "on_trait": [2, 4, 8, 9]})
    markdown = summary_text(test, pointing, RANKS, key_on_trait)
    config = {"dataset": "demo", "ranks": RANKS, "train": {"epochs": 15, "lr": 0.03},
              "data": {"synthetic": {"n_train": 80}, "images": None}, "rank_overrides": {}}
    page = Tables(report.page_html(markdown, config, ("dataset", "ranks", "data", "train", "rank_overrides")))
    accuracy, *pointing_tables, key, single, data, train, overrides = page.tables
    assert len(pointing_tables) == 3 and pointing_tables[-1][1] == ["order", "0.90", "0.05", "0.05", "0.05"]
    assert key[-1] == ["species", "9", "16"]
    assert accuracy[0] == ["rank", "contrast", "top-1 (top-down)", "top-1 among siblings", "top-1 flat", "top-5 flat",
                           "images"]
    assert accuracy[1:] == [[r, "rank", f"{d:.3f}", "1.000", f"{t:.3f}", "1.000", "320"]
                            for r, t, d in zip(RANKS, test["top1"], test["top_down_top1"])]
    assert single[1:] == [["dataset", "demo"], ["ranks", "order → family → genus → species"]]
    assert data[1:] == [["synthetic.n_train", "80"], ["images", "null"]] and train[1:] == [["epochs", "15"],
                                                                                           ["lr", "0.03"]]
    assert overrides[1:] == [["(none)", ""]]
    # flat top-1 >= 0.90 per rank (contrast rank): species missed; then per rank the own trait's pointing game;
    # then the key's entries on the own trait: species missed (9 of 16)
    assert page.items == ["met", "met", "met", "missed"] + ["met"] * 8 + ["met", "met", "met", "missed"]


def test_figure_labels_travel_in_the_png(tmp_path):
    fig = new_figure(1, 1)
    fig.add_subplot().plot([0, 1])
    save_figure(fig, tmp_path / "gallery_Pica_pica_.png",
                report_labels=report.labels("species", "Pica pica é {x}", "trait gallery"))
    labels = report.figure_labels(tmp_path, "gallery_Pica_pica_")
    # the real name, Unicode kept; the brace cannot be taken for a Snakemake wildcard
    assert labels == {"rank": "species", "taxon": "Pica pica é {\u200bx}", "kind": "trait gallery"}
    save_figure(fig, tmp_path / "older.png")
    assert report.figure_labels(tmp_path, "older") == {"rank": "all ranks", "taxon": "all taxa", "kind": "older"}


def localization_table(ranks, parts=("order", "family", "genus", "species", "distractor")):
    rng = np.random.default_rng(0)
    rows = [(rank, method, part, metric, *np.sort(rng.uniform(size=3))[[1, 0, 2]], 8, "siblings") for rank in ranks
            for method in (*METHODS, "random") for part in parts
            for metric in ("pointing_game", "energy_pointing_game")]
    return pd.DataFrame(rows, columns=list(evaluation.LOCALIZATION_COLUMNS))


def test_localization_figure_is_legible_and_its_legend_covers_no_bars():
    fig = evaluation.localization_figure(localization_table(RANKS))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == len(METHODS) + 1
    for axis in fig.axes:
        assert not box.overlaps(axis.get_window_extent(renderer)), axis.get_title()
        assert min(t.get_fontsize() for t in axis.get_xticklabels() + [axis.title]) >= 10
    width, height = fig.get_size_inches()
    assert height <= 7 and width <= 12  # shown whole, unscaled, in the report's window
    with pytest.raises(ValueError, match="no ground truth"):
        evaluation.localization_figure(empty_table(evaluation.LOCALIZATION_COLUMNS))


def test_evenly_spaced_picks_a_bounded_spread_of_the_figures():
    assert report.evenly_spaced(10, 4) == [0, 3, 6, 9]
    assert report.evenly_spaced(3, 24) == [0, 1, 2] and report.evenly_spaced(5, 1) == [0]
    assert report.evenly_spaced(5, 0) == [] and report.evenly_spaced(0, 24) == []
    for n in (25, 480, 10_000):
        picks = report.evenly_spaced(n, 24)
        assert len(set(picks)) == 24 and picks == sorted(picks) and (picks[0], picks[-1]) == (0, n - 1)
        assert max(np.diff(picks)) - min(np.diff(picks)) <= 1  # even


def test_a_figures_folder_shows_its_selection_in_the_report_and_indexes_every_figure(tmp_path):
    from snakemake.io import glob_wildcards

    fig = new_figure(1, 1)
    fig.add_subplot().plot([0, 1])
    written = []
    for i in range(30):
        found = report.labels("species" if i < 20 else "genus", f"Taxon {i} & {{x}}", "trait gallery")
        written.append((save_figure(fig, tmp_path / f"gallery_{i:02d}.png", colours=None, report_labels=found), found))
    shown = [written[i][0] for i in report.evenly_spaced(len(written), 5)]
    index = report.publish_figures(tmp_path, written, shown, "Trait galleries: species",
                                   report.labels("species", kind="gallery index"))
    # what Snakemake's report embeds (the rules' patterns): the selection and the index, nothing else
    found = [name for pattern in report.REPORT_PATTERNS for name in glob_wildcards(str(tmp_path / pattern)).name]
    assert sorted(found) == sorted([path.stem for path in shown] + [report.INDEX])
    assert all((tmp_path / "report" / path.name).read_bytes() == path.read_bytes() for path in shown)
    assert report.result_labels(tmp_path, report.INDEX) == {"rank": "species", "taxon": "all taxa",
                                                            "kind": "gallery index"}
    assert report.result_labels(tmp_path, shown[1].stem) == report.labels("species", "Taxon 7 & {\u200bx}",
                                                                          "trait gallery")
    # the index: every figure, linked relative to the page, grouped by rank in order, the report's marked
    text = index.read_text()
    assert re.findall(r"<h2>([^<]*)</h2>", text) == ["species (20)", "genus (10)"]
    assert re.findall(r'<a href="([^"]+)">', text) == [path.name for path, _ in written]
    assert text.count("<em>in the report</em>") == 5 and ">Taxon 7 &amp; {x}</a>" in text
    # published again with another selection: the report folder holds that one only
    report.publish_figures(tmp_path, written, shown[:1], "again", report.labels(kind="gallery index"))
    assert [path.name for path in (tmp_path / "report").iterdir()] == [shown[0].name]
