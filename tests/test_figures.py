"""Figures from real (tiny) workflow products: attention.h5, traits tables and a manifest of small PNGs."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import make_vit
from taxotrait import figures, report
from taxotrait.attention_store import AttentionFile
from taxotrait.data import AugmentConfig, ImageTransform, load_image
from taxotrait.extract import extract_attention, mask_heads, sibling_classes
from taxotrait.model import PromptCAM
from taxotrait.traits import hierarchy_traits, key_entries, key_table, rank_traits

RANKS = ["genus", "species"]
# odd characters on purpose: file names must be sanitised
TAXONOMY = {"Ab/x sp.1": "Gen x", "Ab/x sp.2": "Gen x", "Cd y": "Gen (y)", "Cd z": "Gen (y)"}
FIGURES = figures.FigureSettings(resize=36, gallery_images=3, max_heads=2, report_galleries=1)
N_IMAGES = 12


def write_images(folder, n):
    """Small non-square PNGs with smooth colour gradients and a bright square at a varying place."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        y, x = np.mgrid[0:40, 0:48] / 48.0
        rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + i)], -1) * 160 + rng.uniform(0, 40, (40, 48, 3))
        top, left = 4 + (i * 5) % 24, 6 + (i * 7) % 30
        rgb[top:top + 10, left:left + 10] = [250, 240, 30]
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def build_model(names, seed=5):
    """A PromptCAM whose predictions depend on the image: timm's small init (std 0.02) makes the image tokens'
    contribution to a class score negligible, so the backbone's linear layers get a larger, trained-like scale."""
    vit = make_vit(seed=seed)
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 2 / module.in_features ** 0.5)
        model = PromptCAM(vit, names)
        model.class_prompts.normal_()
        model.head.weight.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """attention.h5, traits.parquet and key entries per rank, hierarchy_traits.parquet and manifest.parquet."""
    root = tmp_path_factory.mktemp("figures")
    paths = write_images(root, N_IMAGES)
    manifest = pd.DataFrame({"image_id": [f"test/x/img_{i:02d}" for i in range(N_IMAGES)], "path": paths,
                             "split": "test"})
    species_names = sorted(TAXONOMY)
    genus_names = sorted(set(TAXONOMY.values()))
    names_of = {"genus": genus_names, "species": species_names}
    parents_of = {"genus": [""] * len(genus_names), "species": [TAXONOMY[s] for s in species_names]}
    transform = ImageTransform(32, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), AugmentConfig(36, False, False))
    images = torch.stack([transform(load_image(p)) for p in paths])
    out = {"manifest": root / "manifest.parquet", "attention": {}, "traits": {}, "key_entries": {}, "root": root}
    heads_by_rank = []
    for rank in RANKS:
        model = build_model(names_of[rank])
        tokens = model.frozen_tokens(images)
        labels = model.forward_tokens(tokens).argmax(1)  # the model's own predictions: all correctly classified
        manifest[rank] = [names_of[rank][i] for i in labels.tolist()]
        batches = [(manifest["image_id"].tolist()[s:s + 5], tokens[s:s + 5], labels[s:s + 5])
                   for s in range(0, N_IMAGES, 5)]
        path = root / rank / "attention.h5"
        extract_attention(model, batches, N_IMAGES, path, rank, sibling_classes(parents_of[rank], 2), progress=False)
        heads = mask_heads(model, batches, path, rank, progress=False)
        heads_by_rank.append(heads)
        out["attention"][rank] = path
        out["traits"][rank] = root / rank / "traits.parquet"
        rank_traits(heads).to_parquet(out["traits"][rank], index=False)
        out["key_entries"][rank] = root / rank / "key.parquet"
        key_entries(heads).to_parquet(out["key_entries"][rank], index=False)
    manifest.to_parquet(out["manifest"], index=False)
    out["hierarchy"] = root / "hierarchy_traits.parquet"
    hierarchy_traits(heads_by_rank, manifest, RANKS).to_parquet(out["hierarchy"], index=False)
    return out


def assert_readable_png(path, min_size=150):
    image = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = image.shape
    assert min(h, w) >= min_size and max(h, w) < 5000, (path, image.shape)
    assert image.std() > 20, f"{path} looks blank"
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, f"{path} has too few colours"


def test_safe_name():
    assert figures.safe_name("Ab/x sp.1 (β)") == "Ab_x_sp.1____"
    assert figures.safe_name("..") == "_."
    assert figures.safe_name("") == "_"
    used = set()
    assert [figures.unique_name("a_b", used) for _ in range(2)] == ["a_b", "a_b_2"]


def test_eval_crop_is_what_the_model_saw(tmp_path):
    (path,) = write_images(tmp_path, 1)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    model_input = ImageTransform(32, (mean, std), AugmentConfig(36, False, False))(load_image(path))
    crop = figures.eval_crop(path, 32, 36)
    assert crop.shape == (32, 32, 3)
    expected = model_input * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert np.allclose(crop, expected.permute(1, 2, 0).numpy(), atol=1e-5)


def test_overlay_upsamples_the_map_onto_the_image():
    image = np.full((64, 64, 3), 0.5)
    attention_map = np.zeros((4, 4))
    attention_map[3, 0] = 1.0  # bottom-left patch
    fig = figures.new_figure(1, 1)
    shown = figures.overlay(fig.add_subplot(), image, attention_map, title="t")
    heat = shown.get_array()
    assert heat.shape == (64, 64)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert y >= 48 and x < 16
    assert heat.min() == 0 and heat.max() == 1  # normalised per map
    assert 0 < heat[40, 8] < 1  # bilinear, not nearest


def pngs(folder):
    return sorted(folder.glob("*.png"))


def index_links(folder):
    """The files index.html links to, and its report labels."""
    text = (folder / "index.html").read_text()
    return re.findall(r'<a href="([^"]+)">', text), report.result_labels(folder, report.INDEX)


def test_rank_figures_write_one_gallery_per_taxon(products, tmp_path):
    for rank in RANKS:
        traits = pd.read_parquet(products["traits"][rank])
        assert len(traits) and traits["taxon"].nunique() >= 2, "fixture should give several taxa with traits"
        out = tmp_path / rank
        written = figures.rank_figures(rank, products["attention"][rank], products["traits"][rank],
                                       products["manifest"], out, FIGURES)
        expected = {f"gallery_{figures.safe_name(t)}.png" for t in traits["taxon"].unique()} | {"shared_traits.png"}
        assert {p.name for p in pngs(out)} == expected
        assert sorted(written) == pngs(out)
        for path in written:
            assert_readable_png(path)
        # the report's labels: the taxon's own name (not the sanitised file name), the rank and the kind
        shown = [report.figure_labels(out, path.stem) for path in written]
        assert {s["taxon"] for s in shown if s["kind"] == "trait gallery"} == set(traits["taxon"])
        assert [s["kind"] for s in shown].count("shared traits") == 1 and {s["rank"] for s in shown} == {rank}
        # the report shows report_galleries galleries (the first in class order) and the shared traits, the same files
        first = written[0]
        assert sorted(p.name for p in (out / "report").iterdir()) == sorted([first.name, "shared_traits.png"])
        assert (out / "report" / first.name).read_bytes() == first.read_bytes()
        assert report.result_labels(out, first.stem) == report.figure_labels(out, first.stem)
        # and its index links every figure of the folder
        links, labels = index_links(out)
        assert links == [p.name for p in written] and all((out / link).is_file() for link in links)
        assert labels == {"rank": rank, "taxon": report.ALL_TAXA, "kind": "gallery index"}


def test_drawing_processes_write_the_same_figures(products, tmp_path):
    settings = figures.FigureSettings(resize=36, gallery_images=3, max_heads=2, report_galleries=24)
    by_workers = {}
    for workers in (1, 3):
        out = tmp_path / str(workers)
        figures.rank_figures("species", products["attention"]["species"], products["traits"]["species"],
                             products["manifest"], out / "species", settings, workers=workers)
        figures.hierarchy_figures(products["attention"], products["hierarchy"], products["manifest"],
                                  out / "hierarchy", RANKS, settings, workers=workers)
        by_workers[workers] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    assert len(by_workers[1]) >= 6 and by_workers[1] == by_workers[3]


def test_gallery_layout(products):
    rank = "species"
    traits = pd.read_parquet(products["traits"][rank])
    taxon = traits["taxon"].iloc[0]
    top = traits[traits["taxon"] == taxon].head(2)
    with AttentionFile(products["attention"][rank]) as attention:
        rows = attention.correct_rows(taxon)[:3]
        maps = np.stack([attention.head_maps(r, top["prompt"].tolist(), top["head"].tolist()) for r in rows])
        # each trait row's map is its own prompt's head: the true class's slot for the taxon's own prompt
        own = top["prompt"] == taxon
        assert np.array_equal(maps[:, own.to_numpy()], np.stack([attention.maps(r)[0, top["head"][own]] for r in rows]))
    images = [np.random.default_rng(0).uniform(size=(32, 32, 3)) for _ in rows]
    fig = figures.trait_gallery(taxon, top, images, maps, rank=rank)
    axes = fig.get_axes()
    assert len(axes) == (len(top) + 1) * len(rows)
    assert [ax.get_gid() for ax in axes[len(rows)::len(rows)]] == [f"head:{h}" for h in top["head"]]
    assert taxon in fig._suptitle.get_text()


def test_shared_traits_compare_own_and_sibling_prompts(products):
    rank = "species"
    traits = pd.read_parquet(products["traits"][rank])
    manifest = pd.read_parquet(products["manifest"])
    with AttentionFile(products["attention"][rank]) as attention:
        images = figures.ImageSource(manifest, attention.img_size, 36)
        examples = figures.shared_examples(attention, traits, images, max_heads=2)
        assert examples
        for example in examples:
            assert TAXONOMY[example.sibling] == TAXONOMY[example.taxon] and example.sibling != example.taxon
            row = attention.row_of[example.image_id]
            slot = list(attention.classes[row]).index(attention.class_names.index(example.sibling))
            assert slot >= 2
            assert np.array_equal(example.sibling_maps, attention.maps(row)[slot, example.heads])
            assert not np.array_equal(example.own_maps, example.sibling_maps)
    fig = figures.shared_traits_figure(examples, rank)
    assert len([ax for ax in fig.get_axes() if (ax.get_gid() or "").startswith("sibling:")]) == sum(
        len(e.heads) for e in examples)


def test_hierarchy_figures_one_column_per_rank(products, tmp_path):
    out = tmp_path / "hierarchy"
    written = figures.hierarchy_figures(products["attention"], products["hierarchy"], products["manifest"], out, RANKS,
                                        FIGURES)
    table = pd.read_parquet(products["hierarchy"])
    assert {p.name for p in written} == {f"{figures.safe_name(s)}.png" for s in table["species"].unique()}
    assert sorted(written) == pngs(out)
    for path in written:
        assert_readable_png(path)
    assert [p.name for p in (out / "report").iterdir()] == [written[0].name]  # report_galleries: 1
    links, labels = index_links(out)
    assert links == [p.name for p in written] and labels["kind"] == "coarse-to-fine index"

    species = table["species"].iloc[0]
    manifest = pd.read_parquet(products["manifest"])
    files = [AttentionFile(products["attention"][r]) for r in RANKS]
    try:
        candidates = manifest.loc[manifest["species"] == species, "image_id"].tolist()
        image_id, columns = figures.species_columns(species, files, table, candidates, max_heads=2)
    finally:
        for f in files:
            f.close()
    assert [c.rank for c in columns] == RANKS
    assert columns[0].taxon == manifest.set_index("image_id").loc[image_id, "genus"]
    fig = figures.hierarchy_figure(species, np.random.default_rng(0).uniform(size=(32, 32, 3)), columns, image_id)
    x_of = {}
    for ax in fig.get_axes():
        gid = ax.get_gid() or ""
        if gid.startswith("rank:"):
            x_of.setdefault(gid.split(":")[1], set()).add(round(ax.get_position().x0, 4))
    assert list(x_of) == RANKS  # coarse to fine
    assert all(len(xs) == 1 for xs in x_of.values())  # each rank is one column
    assert sorted(x for xs in x_of.values() for x in xs) == [x for r in RANKS for x in x_of[r]]


def test_missing_image_names_the_path(products, tmp_path):
    manifest = pd.read_parquet(products["manifest"])
    missing = tmp_path / "gone" / "img_missing.png"
    manifest["path"] = str(missing)
    manifest.to_parquet(tmp_path / "manifest.parquet", index=False)
    with pytest.raises(FileNotFoundError, match="img_missing.png"):
        figures.rank_figures("species", products["attention"]["species"], products["traits"]["species"],
                             tmp_path / "manifest.parquet", tmp_path / "out", FIGURES)
    with pytest.raises(FileNotFoundError, match="img_missing.png"):
        figures.hierarchy_figures(products["attention"], products["hierarchy"], tmp_path / "manifest.parquet",
                                  tmp_path / "hier", RANKS, FIGURES)


def test_no_traits_writes_no_empty_figure(products, tmp_path, caplog):
    empty = pd.read_parquet(products["traits"]["genus"]).iloc[:0]
    empty.to_parquet(tmp_path / "traits.parquet", index=False)
    written = figures.rank_figures("genus", products["attention"]["genus"], tmp_path / "traits.parquet",
                                   products["manifest"], tmp_path / "out", FIGURES)
    pd.read_parquet(products["hierarchy"]).iloc[:0].to_parquet(tmp_path / "hierarchy.parquet", index=False)
    written += figures.hierarchy_figures(products["attention"], tmp_path / "hierarchy.parquet", products["manifest"],
                                         tmp_path / "hier", RANKS, FIGURES)
    assert written == [] and pngs(tmp_path / "out") == pngs(tmp_path / "hier") == []
    for folder in (tmp_path / "out", tmp_path / "hier"):  # the index says so; the report shows it alone
        assert index_links(folder)[0] == [] and list((folder / "report").iterdir()) == []
        assert "No figure" in (folder / "index.html").read_text()
    assert "no shared-traits figure" in caplog.text and "no species has trait heads" in caplog.text


def test_only_correctly_classified_images_are_shown(products, tmp_path):
    import shutil

    import h5py

    path = tmp_path / "attention.h5"
    shutil.copy(products["attention"]["species"], path)
    with AttentionFile(path) as attention:
        taxon = attention.class_names[attention.labels[0]]
        before = attention.correct_rows(taxon).tolist()
    assert 0 in before
    with h5py.File(path, "r+") as h5:
        h5["prediction"][0] = (h5["label"][0] + 1) % len(h5["class_names"])
    with AttentionFile(path) as attention:
        assert attention.correct_rows(taxon).tolist() == [r for r in before if r != 0]
        assert len(attention.correct_rows("no such taxon")) == 0


def classes_table(parent_of: dict[str, str], ranks) -> pd.DataFrame:
    """classes.parquet of a two-rank taxonomy {child: parent} (class indices in sorted order)."""
    rows = [(ranks[0], i, g, "") for i, g in enumerate(sorted(set(parent_of.values())))]
    rows += [(ranks[1], i, s, parent_of[s]) for i, s in enumerate(sorted(parent_of))]
    return pd.DataFrame(rows, columns=["rank", "class_index", "taxon", "parent"])


def test_key_figure_draws_every_taxon_at_its_place_in_the_tree(products, tmp_path):
    classes = classes_table(TAXONOMY, RANKS)
    tree = figures.taxon_tree(classes, RANKS)
    position = figures.leaf_order(tree, tree[figures.ROOT])
    # leaves 0..3 in depth-first order, each genus at the mean of its species
    assert sorted(position[("species", s)] for s in TAXONOMY) == [0, 1, 2, 3]
    for genus in set(TAXONOMY.values()):
        kids = [position[("species", s)] for s, g in TAXONOMY.items() if g == genus]
        assert position[("genus", genus)] == pytest.approx(np.mean(kids)) and max(kids) - min(kids) == 1
    classes.to_parquet(tmp_path / "classes.parquet")
    key_table([pd.read_parquet(products["key_entries"][r]) for r in RANKS], classes, RANKS).to_parquet(
        tmp_path / "key.parquet")
    written = figures.key_figures(tmp_path / "key.parquet", tmp_path / "classes.parquet", products["attention"],
                                  products["manifest"], tmp_path / "key", RANKS, 36, report_pages=1)
    assert [p.name for p in written] == ["key_1_top.png"] == [p.name for p in pngs(tmp_path / "key")]
    assert_readable_png(written[0])
    (page,) = figures.key_pages(tree)  # the page drawn again, to read where its panels are
    panels = {node: figures.KeyPanel(node[1]) for node in page.taxa}
    fig = figures.key_page_figure(page, panels, figures.Crop(32, 36), "t")
    box = {tuple(ax.get_gid().split(":")[1:]): ax.get_position() for ax in fig.get_axes()[1:]}
    assert sorted(box) == sorted(zip(classes["rank"], classes["taxon"]))  # a panel per taxon
    for species, genus in TAXONOMY.items():  # each genus above its species, between them
        g, s = box[("genus", genus)], box[("species", species)]
        assert g.y0 > s.y0 and abs((g.x0 + g.x1) / 2 - (s.x0 + s.x1) / 2) < g.width
    assert report.result_labels(tmp_path / "key", "key_1_top")["kind"] == "key figure"
    assert index_links(tmp_path / "key")[0] == ["key_1_top.png"]


def test_key_pages_of_a_wide_taxonomy_stay_within_the_pixel_bound(tmp_path):
    """Many genera, one of them with many species: every taxon on exactly one page, every page at most 20 Mpx,
    a taxon's children drawn below it or starting the page it names."""
    parent_of = {f"Big sp{i:03d}": "Genus big" for i in range(130)}
    parent_of |= {f"Small{g:02d} sp{i}": f"Genus {g:02d}" for g in range(70) for i in range(1 + g % 3)}
    classes = classes_table(parent_of, RANKS)
    tree = figures.taxon_tree(classes, RANKS)
    pages = figures.key_pages(tree)
    drawn = [node for page in pages for node in page.taxa]
    assert sorted(drawn) == sorted(zip(classes["rank"], classes["taxon"]))  # each taxon exactly once
    page_of = {node: page.number for page in pages for node in page.taxa}
    for page in pages:
        for node in page.taxa:
            kids = tree.get(node, [])
            assert page.children.get(node, kids) == kids
            if kids and node not in page.children:  # continued: the page it names starts with its children
                assert page_of[kids[0]] == page.links[node] and pages[page.links[node] - 1].context == node
    assert len(pages) > 3 and {len(page.levels) for page in pages} == {1, 2}
    crop = figures.Crop(32, 36)
    for page in pages:
        panels = {node: figures.KeyPanel(node[1], note="no image") for node in page.taxa}
        fig = figures.key_page_figure(page, panels, crop, figures.key_page_title(page, len(pages)))
        path = figures.save_figure(fig, tmp_path / f"{page.number}.png", tight=False, colours=None)
        with Image.open(path) as image:
            assert 20e6 / 100 < image.width * image.height <= 20e6, (page.number, image.size)
    # deep trees: at most KEY_PAGE_ROWS ranks a page
    chain = {figures.ROOT: [("r0", "t0")], **{(f"r{i}", f"t{i}"): [(f"r{i + 1}", f"t{i + 1}")] for i in range(19)}}
    deep = figures.key_pages(chain)
    assert [len(page.levels) for page in deep] == [8, 8, 4]
    assert [node for page in deep for node in page.taxa] == [(f"r{i}", f"t{i}") for i in range(20)]
