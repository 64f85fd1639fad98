"""Any tree: a Newick phylogeny read as the rank table a taxonomy CSV gives, and each bad tree's message."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from taxotrait.config import check_config
from taxotrait.dataset import prepare_files
from taxotrait.errors import ConfigError, DatasetError
from taxotrait.schema import with_defaults
from taxotrait.taxonomy import parse_newick, tree_depth, tree_taxonomy

REPO = Path(__file__).resolve().parents[1]
RANKS = ["family", "genus", "species"]
SPECIES = {"Turdus merula": ("Turdidae", "Turdus"), "Turdus philomelos": ("Turdidae", "Turdus"),
           "Erithacus rubecula": ("Turdidae", "Erithacus"), "Luscinia luscinia": ("Turdidae", "Erithacus"),
           "Sylvia atricapilla": ("Sylviidae", "Sylvia"), "Sylvia borin": ("Sylviidae", "Sylvia"),
           "Curruca communis": ("Sylviidae", "Curruca")}
# the same taxonomy as a phylogeny: quoted labels, branch lengths, a comment, a single-child node around a leaf
NEWICK = ("((('Turdus merula':0.1,'Turdus philomelos':0.2)Turdus:0.5,('Erithacus rubecula',"
          "('Luscinia luscinia'))Erithacus)Turdidae:1.0,(('Sylvia atricapilla','Sylvia borin')Sylvia[a genus],"
          "('Curruca communis')Curruca)Sylviidae)Passeriformes;")


def image_tree(root: Path, species=SPECIES) -> Path:
    for split in ("train", "test"):
        for name in species:
            folder = root / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (16, 16), (len(name) * 9 % 255, 80, 120)).save(folder / "0.png")
    return root


def prepare(tmp_path, data: dict, ranks=RANKS) -> pd.DataFrame:
    outputs = {key: tmp_path / f"{key}.parquet" for key in ("manifest", "classes", "rejects")}
    inputs = {key: value for key, value in data.items() if key in ("taxonomy", "tree", "manifest")}
    prepare_files(inputs, outputs, with_defaults({"data": data})["data"], ranks)
    return pd.read_parquet(outputs["classes"])


def test_a_newick_tree_and_the_equivalent_rank_table_give_the_same_classes_and_parents(tmp_path):
    images = image_tree(tmp_path / "images")
    table = pd.DataFrame([(family, genus, name) for name, (family, genus) in SPECIES.items()], columns=RANKS)
    (tmp_path / "taxonomy.csv").write_text(table.to_csv(index=False))
    (tmp_path / "tree.nwk").write_text(NEWICK)
    from_table = prepare(tmp_path / "a", {"images": str(images), "taxonomy": str(tmp_path / "taxonomy.csv")})
    from_tree = prepare(tmp_path / "b", {"images": str(images), "tree": str(tmp_path / "tree.nwk")})
    pd.testing.assert_frame_equal(from_tree, from_table)
    assert from_tree.groupby("rank").size().to_dict() == {"family": 2, "genus": 4, "species": 7}


def test_newick_reading():
    root = parse_newick(NEWICK, "t.nwk")
    assert tree_depth(root) == 3 and root.name == "Passeriformes"
    # an unnamed single-child node is collapsed into its child
    assert [c.name for c in root.children] == ["Turdidae", "Sylviidae"]
    assert [c.name for c in root.children[1].children] == ["Sylvia", "Curruca"]  # a named monotypic genus is kept
    assert [c.name for c in root.children[0].children[1].children] == ["Erithacus rubecula", "Luscinia luscinia"]
    unnamed = parse_newick("((A,B),(C,D)x);")
    assert [c.name for c in unnamed.children] == ["node 1", "x"]
    assert parse_newick("('O''Brien',B);").children[0].name == "O'Brien"


def test_leaves_at_different_depths_are_carried_down_by_monotypic_stand_ins(tmp_path):
    path = tmp_path / "t.nwk"
    path.write_text("(((A,B)G1,C)F1,((D,E)G2,(F,H)G3)F2);")
    table = tree_taxonomy(path, RANKS)
    assert table.set_index("species").loc["C"].tolist() == ["F1", "C [genus]"]
    assert len(table) == 7 and table["species"].is_unique


@pytest.mark.parametrize("text,message", [
    ("((A,B),(C,D);", r"t\.nwk: not a Newick tree: expected ',' or '\)' at line 1, character 13"),
    ("((A,B),(C,A));", r"t\.nwk: the label 'A' is used twice"),
    ("((A,B)G,(C,D)G);", r"t\.nwk: the label 'G' is used twice \(internal node and internal node\)"),
    ("((A,B),(C,D));\n((A,B),(C,D));", r"text after the tree's ';' \(one tree per file\)"),
    ("((A:x,B),(C,D));", r"expected a branch length after ':'"),
    ("", r"the file is empty"),
    ("(((A,B)));", r"the tree has 1 level below the root but ranks names 3"),
])
def test_each_bad_tree_stops_with_its_message(tmp_path, text, message):
    path = tmp_path / "t.nwk"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        tree_taxonomy(path, RANKS)


def test_leaves_and_images_must_match(tmp_path):
    tree = tmp_path / "tree.nwk"
    tree.write_text("(((A,B)G1,(C,D)G2)F1,((E,F)G3,(H,I)G4)F2);")
    leaves = {name: None for name in "ABCDEFHI"}
    with pytest.raises(DatasetError, match=r"tree.nwk: 1 leaves of the tree have no images, e.g. \['I'\]"):
        prepare(tmp_path / "a", {"images": str(image_tree(tmp_path / "i1", {k: v for k, v in leaves.items()
                                                                              if k != "I"})), "tree": str(tree)})
    with pytest.raises(DatasetError, match=r"1 species of the images are not leaves of the tree, e.g. \['Z'\]"):
        prepare(tmp_path / "b", {"images": str(image_tree(tmp_path / "i2", {**leaves, "Z": None})),
                                 "tree": str(tree)})
    tree.write_text("(((A_x,B)G1,(C,D)G2)F1,((E,F)G3,(H,I)G4)F2);")
    with pytest.raises(DatasetError, match=r"the tree spells 'A x' with '_' or ' ' swapped"):
        prepare(tmp_path / "c", {"images": str(image_tree(tmp_path / "i3", {**leaves, "A x": None})),
                                 "tree": str(tree)})


def test_the_tree_is_checked_when_the_workflow_starts(tmp_path):
    tree = tmp_path / "tree.nwk"
    tree.write_text("((A,B),(C,D));")
    images = image_tree(tmp_path / "images", dict.fromkeys("ABCD"))
    config = {"data": {"images": str(images), "tree": str(tree)}, "ranks": RANKS, "backbone": {"weights": None},
              "augment": {"resize": 240}}
    config["backbone"]["img_size"] = 224
    with pytest.raises(ConfigError, match=r"data.tree: .*tree.nwk: the tree has 2 levels below the root but ranks "
                                          r"names 3 \(family, genus, species\); set ranks to 2 names"):
        check_config(config)
    config["data"]["taxonomy"] = str(tree)
    with pytest.raises(ConfigError, match="give either a taxonomy table .* or a tree"):
        check_config(config)
    # through Snakemake: the run stops before any job, naming the key
    (tmp_path / "c.yaml").write_text(f"data: {{synthetic: null, images: {images}, tree: {tree}}}\n")
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(tmp_path / "c.yaml"),
                          "--config", f"results={tmp_path}/r"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode and "data.tree:" in out.stdout + out.stderr and "set ranks to 2 names" in out.stdout + out.stderr
