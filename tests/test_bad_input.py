"""Bad input as a biologist's data comes: image trees and tables as users, file managers and spreadsheets produce them.

Each case is handled in a documented way (taken, or listed in rejects.parquet with the reason) or stops with one
message naming the file, row, taxon or key: never a traceback, never a silent drop (README, "What happens when").
"""

import logging
import os
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from taxotrait.config import check_yaml, ranks_to_train
from taxotrait.dataset import (
    check_image, dataset_fingerprint, prepare_dataset, read_manifest, read_taxonomy, scan_image_tree,
)
from taxotrait.errors import ConfigError, DatasetError
from taxotrait.traits import describe_traits, image_region
from test_workflow import REPO, snakemake

RANKS = ["order", "genus", "species"]
TAXONOMY = "order,genus,species\nOrdo A,Genus a,Sp a1\nOrdo A,Genus a,Sp a2\nOrdo B,Genus b,Sp b1\n"


def picture(path, seed=0, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def tree(root, species=("Sp a1", "Sp a2", "Sp b1"), splits=("train", "test"), per_split=2):
    for split in splits:
        for k, name in enumerate(species):
            for i in range(per_split):
                picture(root / split / name / f"{i}.png", seed=10 * k + i)
    return root


def prepare(root, taxonomy_text=TAXONOMY, tmp=None, **kwargs):
    """scan + taxonomy + prepare_dataset, as the prepare step does."""
    taxonomy = Path(tmp or root.parent) / "taxonomy.csv"
    taxonomy.write_text(taxonomy_text)
    return prepare_dataset(scan_image_tree(root), read_taxonomy(taxonomy, RANKS), RANKS, str(root), progress=False,
                           **kwargs)


# ------------------------------------------------------------------------------------------------ the image tree
def test_images_in_sub_folders_of_a_species_folder_are_taken(tmp_path):
    root = tree(tmp_path / "images")
    for year in ("2023", "2024/May"):
        picture(root / "train" / "Sp a1" / year / "0.png", seed=7)  # same file name as the top-level one
    manifest, classes, rejects = prepare(root)
    taken = manifest[manifest["species"] == "Sp a1"]
    assert set(taken["image_id"]) == {"train/Sp a1/0", "train/Sp a1/1", "train/Sp a1/2023/0",
                                      "train/Sp a1/2024/May/0", "test/Sp a1/0", "test/Sp a1/1"}
    assert rejects.empty and classes.set_index(["rank", "taxon"]).loc[("species", "Sp a1"), "n_train"] == 4


def test_every_format_pil_reads_is_taken_and_other_files_are_listed(tmp_path):
    root = tree(tmp_path / "images")
    folder = root / "train" / "Sp b1"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8))
    for name in ("a.gif", "b.webp", "c.tif", "d.bmp", "e.JPG", "f.jpeg", "g.tiff", "h.jp2", "i.ppm", "j.tga"):
        image.save(folder / name, format={"JPG": "JPEG"}.get(name.split(".")[1].upper()))
    (folder / "notes.txt").write_text("collected by the museum\n")
    (folder / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))  # an iPhone photo PIL cannot read
    manifest, _, rejects = prepare(root, max_reject_fraction=0.1)
    names = {Path(p).name for p in manifest.loc[manifest["species"] == "Sp b1", "path"]}
    assert {"a.gif", "b.webp", "c.tif", "d.bmp", "e.JPG", "f.jpeg", "g.tiff", "h.jp2", "i.ppm", "j.tga"} <= names
    reasons = dict(zip(rejects["path"].map(lambda p: Path(p).name), rejects["reason"]))
    assert reasons == {"notes.txt": "skipped: not an image file (.txt)",  # listed, not counted as a rejected image
                       "IMG_0001.HEIC": "not an image: PIL cannot identify its format (.heic files must be "
                                        "converted, e.g. to JPEG)"}
    with pytest.raises(DatasetError, match=r"1 of 23 images rejected.*IMG_0001\.HEIC: not an image"):
        prepare(root)  # the HEIC photo counts (1 of 23 images), the text file does not


def test_macos_and_hidden_files_are_ignored(tmp_path):
    root = tree(tmp_path / "images")
    (root / "train" / "Sp a1" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    (root / "train" / "Sp a1" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / ".DS_Store").write_bytes(b"Bud1")
    picture(root / "train" / "Sp a1" / ".thumbnails" / "0.png")
    picture(root / "__MACOSX" / "train" / "Sp a1" / "._0.png")  # what unzipping a macOS archive leaves
    (root / "test" / "Sp a2" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    manifest, _, rejects = prepare(root, max_reject_fraction=0.0)
    assert len(manifest) == 12 and rejects.empty


def test_files_outside_species_folders_and_empty_species_folders_are_listed(tmp_path, caplog):
    root = tree(tmp_path / "images")
    picture(root / "train" / "loose.png")
    (root / "README.txt").write_text("images of the 2024 survey\n")
    (root / "val" / "Sp a1").mkdir(parents=True)  # a species folder with nothing in it
    with caplog.at_level(logging.INFO, logger="taxotrait.dataset"):
        manifest, _, rejects = prepare(root, max_reject_fraction=0.0)
    assert len(manifest) == 12
    assert rejects.set_index("image_id")["reason"].to_dict() == {
        "README": "skipped: outside the split folders",
        "train/loose": "skipped: outside a species folder (<split>/<species>/<image>)",
        "val/Sp a1": "skipped: empty folder"}
    # prepare logs per species what it took, rejected and skipped
    assert "Sp a1: 4 images taken (train 2, val 0, test 2), 0 rejected, 1 skipped" in caplog.text
    assert "Sp b1: 4 images taken (train 2, val 0, test 2), 0 rejected, 0 skipped" in caplog.text


def test_a_species_whose_training_files_cannot_be_used_is_named(tmp_path):
    root = tree(tmp_path / "images")
    for i in range(2):
        (root / "train" / "Sp b1" / f"{i}.png").unlink()
        (root / "train" / "Sp b1" / f"{i}.HEIC").write_bytes(b"not decodable")
    with pytest.raises(DatasetError, match=r"species 'Sp b1' has no training images \(usable: \{'test': 2\}; its 2 "
                                           r"training files: e\.g\. .*0\.HEIC: not an image"):
        prepare(root, max_reject_fraction=0.5)
    shutil.rmtree(root / "train" / "Sp b1")
    (root / "train" / "Sp b1").mkdir()  # only an empty folder left: named too, not its order
    with pytest.raises(DatasetError, match=r"species 'Sp b1' has no training images \(usable: \{'test': 2\}; its 1 "
                                           r"training files: e\.g\. .*Sp b1: skipped: empty folder"):
        prepare(root)


def test_symbolic_link_loops_are_not_followed(tmp_path, caplog):
    root = tree(tmp_path / "images")
    (root / "train" / "Sp a1" / "again").symlink_to(root / "train" / "Sp a1")  # a loop back to the folder itself
    (root / "train" / "Sp a2" / "up").symlink_to(root)  # a loop to the tree's root
    (root / "train" / "Sp b1" / "loop.png").symlink_to(root / "train" / "Sp b1" / "loop.png")  # links to itself
    (root / "train" / "Sp b1" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a broken link
    elsewhere = tree(tmp_path / "elsewhere", species=("Sp a2",), splits=("val",))
    (root / "val").symlink_to(elsewhere / "val")  # a linked split folder is followed
    with caplog.at_level(logging.WARNING, logger="taxotrait.dataset"):
        manifest, _, rejects = prepare(root, max_reject_fraction=0.2)
    assert len(manifest) == 14 and set(manifest.loc[manifest["split"] == "val", "species"]) == {"Sp a2"}
    assert re.search(r"Sp a1/again: a symbolic link to a folder above it \(a loop\): not followed", caplog.text)
    assert "Sp a2/up: a symbolic link to a folder above it" in caplog.text
    reasons = dict(zip(rejects["path"].map(lambda p: Path(p).name), rejects["reason"]))
    assert reasons == {"loop.png": "cannot read: Too many levels of symbolic links", "gone.png": "file not found"}


def test_decomposed_unicode_folder_names_match_the_taxonomy(tmp_path):
    """macOS writes file names decomposed (NFD: 'e' + combining accent); the taxonomy typed in a spreadsheet is
    composed (NFC). Both spellings are the same name."""
    composed = {"Pica pica é": "Ordo Ä", "Ursus ü": "Ordo Ö"}
    root = tmp_path / "images"
    for k, name in enumerate(composed):
        for split in ("train", "test"):
            picture(root / split / unicodedata.normalize("NFD", name) / "0.png", seed=k)
    assert all(unicodedata.is_normalized("NFD", p.name) for p in (root / "train").iterdir())
    rows = "".join(f"{order},{unicodedata.normalize('NFC', order)} g,{name}\n" for name, order in composed.items())
    manifest, classes, _ = prepare(root, "order,genus,species\n" + rows)
    assert set(manifest["species"]) == set(composed) and set(classes["taxon"]) >= set(composed)
    assert "train/Pica pica é/0" in set(manifest["image_id"])  # ids are composed too
    # a near miss is named with the row it resembles
    rows = rows.replace("Ursus ü", "Ursus u")
    with pytest.raises(DatasetError, match=r"1 species without a taxonomy row, e\.g\. 'Ursus ü' \(the taxonomy has "
                                           r"'Ursus u'\)"):
        prepare(root, "order,genus,species\n" + rows)


# ------------------------------------------------------------------------------------------------------ tables
def test_taxonomy_saved_by_excel_in_windows_1252_is_read(tmp_path, caplog):
    text = "order;genus;species\nOrdo A;Genus a;Bécasse des bois\nOrdo B;Genus b;Pie-grièche\n"  # Excel: ';', cp1252
    (tmp_path / "tax.csv").write_bytes(text.encode("cp1252"))
    with caplog.at_level(logging.WARNING, logger="taxotrait.dataset"):
        table = read_taxonomy(tmp_path / "tax.csv", RANKS)
    assert table["species"].tolist() == ["Bécasse des bois", "Pie-grièche"]
    assert re.search(r"tax\.csv is not UTF-8: read as Windows-1252 .*line 2 reads 'Ordo A;Genus a;Bécasse des bois'",
                     caplog.text)
    # Excel's "CSV UTF-8" starts with a byte-order mark; a row of empty cells is what deleting a row's contents leaves
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + "order,genus,species\n,,\nO,G,Bécasse\n".encode())
    assert read_taxonomy(tmp_path / "bom.csv", RANKS)["species"].tolist() == ["Bécasse"]
    (tmp_path / "utf16.csv").write_bytes("order\tgenus\tspecies\nO\tG\tPie\n".encode("utf-16"))  # "Unicode text"
    assert read_taxonomy(tmp_path / "utf16.csv", RANKS)["species"].tolist() == ["Pie"]


@pytest.mark.parametrize("content,message", [
    (b"PK\x03\x04\x14\x00\x06\x00" + bytes(100), r"an Excel workbook, not a CSV text file: save it from Excel as "
                                                  r"'CSV UTF-8'"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100), "an Excel workbook"),  # the old .xls
    (b"order,genus,species\nO,G,Sp \x81\x8d\n", r"not UTF-8 text \(byte 0x81 on line 2\): save it as UTF-8"),
    (b"", "empty file"),
    (b"order,genus,species\nO,G,s,extra,more\nO,G\n", r"not a valid CSV table: .*line 2"),
])
def test_a_table_that_is_not_csv_text_is_named(tmp_path, content, message):
    for name, read in (("taxonomy.csv", lambda p: read_taxonomy(p, RANKS)), ("manifest.csv", read_manifest)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatasetError, match=rf"{re.escape(str(tmp_path / name))}: {message}"):
            read(tmp_path / name)


def test_manifest_in_windows_1252(tmp_path):
    picture(tmp_path / "a.png")
    picture(tmp_path / "b.png", seed=1)
    text = "path;split;order;genus;species\na.png;train;Ordo;Genus;Bécasse\nb.png;train;Ordo;Genus;Pie\n"
    (tmp_path / "m.csv").write_bytes(text.encode("cp1252"))
    manifest, _, _ = prepare_dataset(read_manifest(tmp_path / "m.csv"), None, RANKS, "m.csv", progress=False)
    assert manifest["species"].tolist() == ["Bécasse", "Pie"]


# ------------------------------------------------------------------------------------------- degenerate trees
def test_a_single_species_stops(tmp_path):
    root = tree(tmp_path / "images", species=("Sp a1",))
    with pytest.raises(DatasetError, match=r"a single species \('Sp a1'\): nothing to tell apart; taxotrait needs two "
                                           r"species at least"):
        prepare(root)
    config = tree_config(tmp_path, root)
    out = snakemake("--configfile", config, "-n", check=False)
    assert out.returncode and re.search(r"DatasetError: .*images: a single species: nothing to tell apart",
                                        output(out))
    assert not stack_frames(out)


def test_a_rank_with_a_single_taxon_is_skipped_with_a_warning(tmp_path, caplog):
    root = tree(tmp_path / "images", species=("Sp a1", "Sp a2"))  # one order and one genus: only species differ
    with caplog.at_level(logging.WARNING, logger="taxotrait.dataset"):
        _, classes, _ = prepare(root)
    assert "order has a single taxon ('Ordo A'): nothing to contrast" in caplog.text
    assert "genus has a single taxon ('Genus a')" in caplog.text
    out = snakemake("--configfile", tree_config(tmp_path, root), "-n")
    for rank in ("order", "genus"):
        assert f"{rank} has a single taxon: nothing to contrast, no model is trained at this rank" in output(out)
    trained = re.findall(r"rule train:\n(?:\s+.*\n)*?\s+wildcards: rank=(\w+)", output(out))
    assert trained == ["species"]
    # a Newick tree: a single-child root is collapsed (taxotrait.taxonomy), so its top rank has two taxa at least;
    # counted on the whole tree (every leaf needs images), here with a monotypic genus: no rank is dropped
    (tmp_path / "tree.nwk").write_text("((('Sp a1','Sp a2')'Genus a')'Ordo A',(('Sp b1')'Genus b')'Ordo B');")
    data = {"synthetic": None, "images": str(tree(tmp_path / "three")), "tree": str(tmp_path / "tree.nwk")}
    assert ranks_to_train({"ranks": RANKS, "data": data}, warn=False) == RANKS
    config = {"ranks": ["order", "family", "genus", "species"], "data": {"synthetic": {
        "n_orders": 1, "families_per_order": 1, "genera_per_family": 2, "species_per_genus": 2}}}
    assert ranks_to_train(config, warn=False) == ["genus", "species"]  # the demo's shape decides there
    # under contrast siblings, a rank whose every taxon is its parent's only child has no fork: dropped too
    config["data"]["synthetic"].update(n_orders=2, genera_per_family=1)
    with caplog.at_level(logging.WARNING, logger="taxotrait"):
        assert ranks_to_train({**config, "contrast": "siblings"}) == ["order", "species"]
    assert "every family is the only one of its parent: nothing to contrast under contrast siblings" in caplog.text
    assert "every genus is the only one of its parent" in caplog.text
    assert ranks_to_train({**config, "contrast": "rank"}, warn=False) == config["ranks"]


def test_adding_or_replacing_images_reruns_prepare(tmp_path):
    root = tree(tmp_path / "images")
    config = tree_config(tmp_path, root)
    target = str(tmp_path / "results" / "user" / "manifest.parquet")
    snakemake(target, "--configfile", config)  # targets first: --configfile reads every word after it (README)
    assert "Nothing to be done" in dry(config, target)
    picture(root / "train" / "Sp a1" / "2025" / "new.png", seed=5)  # a new image in a new sub-folder
    planned = dry(config, target)
    assert "prepare" in jobs_of(planned) and "Params have changed" in planned
    snakemake(target, "--configfile", config)
    assert len(pd.read_parquet(target)) == 13
    replaced = root / "test" / "Sp b1" / "0.png"
    picture(replaced, seed=99)  # the same name, new pixels
    os.utime(replaced, ns=(replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns + 10**9))
    assert "prepare" in jobs_of(dry(config, target))
    (root / "train" / "Sp a1" / "._new.png").write_bytes(b"AppleDouble")  # a hidden file is no content
    snakemake(target, "--configfile", config)
    (root / "train" / "Sp a1" / ".DS_Store").write_bytes(b"Bud1")
    assert "Nothing to be done" in dry(config, target)


def test_the_files_a_manifest_lists_decide_whether_prepare_reruns(tmp_path):
    picture(tmp_path / "a.png")
    picture(tmp_path / "b.png", seed=1)
    (tmp_path / "m.csv").write_text("path,split,order,genus,species\na.png,train,O,G,s1\nb.png,train,O,G,s2\n")
    data = {"synthetic": None, "manifest": str(tmp_path / "m.csv")}
    before = dataset_fingerprint(data)
    assert dataset_fingerprint(data) == before  # no file changed
    picture(tmp_path / "b.png", seed=2, size=(24, 16))  # replaced, the manifest unchanged
    assert dataset_fingerprint(data) != before
    changed = dataset_fingerprint(data)
    (tmp_path / "b.png").unlink()
    assert dataset_fingerprint(data) != changed


# ------------------------------------------------------------------------------------------------------ config
def test_config_mistakes_name_the_key_without_stack_frames(tmp_path):
    bad = tmp_path / "bad.yaml"
    # every schema mistake named at once; a dotted key, as written on a command line, with the nesting it means
    bad.write_text("train: {lr: fast, bogus_key: 1, epochs: 0}\ntrain.epochs: 30\n")
    out = snakemake("--configfile", "tests/data/tiny.yaml", str(bad), "--config", f"results={tmp_path}", "-n",
                    check=False)
    assert out.returncode and "ConfigError: invalid configuration" in output(out)
    assert "train.lr: 'fast' is not of type 'number'" in output(out) and not stack_frames(out)  # a wrong type
    assert "train.bogus_key: unknown key (allowed: batch_size," in output(out)  # an unknown key
    assert "train.epochs: 0 is less than the minimum of 1" in output(out)  # out of range
    assert re.search(r"train\.epochs: unknown key \(allowed: .*\); nest it instead: train: \{epochs: \.\.\.\}",
                     output(out))
    bad.write_text("evaluation: {parts: nowhere/CUB_200_2011}\n")  # checked before the rules' input functions run
    out = snakemake("--configfile", "tests/data/tiny.yaml", str(bad), "--config", f"results={tmp_path}", "-n",
                    check=False)
    assert out.returncode and "ConfigError: evaluation.parts: nowhere/CUB_200_2011 does not exist" in output(out)
    assert not stack_frames(out)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("dataset: birds\ntrain:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"config\.yaml, line 4, column 1: not valid YAML: expected ',' or ']'"):
        check_yaml(tmp_path / "config" / "config.yaml")
    # the workflow's own config/config.yaml, e.g. with the workflow run from another folder
    out = snakemake("-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n", check=False)
    assert out.returncode and "ConfigError: config/config.yaml, line 4, column 1: not valid YAML" in output(out)
    assert not stack_frames(out)
    # a --configfile file is read by Snakemake itself before the workflow starts: --verbose names it (README)
    (tmp_path / "mine.yaml").write_text("train:\n\tepochs: 3\n")
    out = snakemake("--configfile", str(tmp_path / "mine.yaml"), "-n", "--verbose", check=False)
    assert out.returncode and f'in "{tmp_path / "mine.yaml"}", line 2' in output(out)


# ------------------------------------------------------------------------------------------------------ traits
def test_traits_without_ground_truth_say_where_the_head_looks():
    traits = pd.DataFrame({"rank": "species", "taxon": "Turdus merula", "head": [3, 5], "n_images": [9, 6],
                           "frequency": [0.9, 0.6], "mean_importance": [1.0, 0.5], "peak_x": [0.1, 0.5],
                           "peak_y": [0.2, 0.9], "spread": [0.12, 0.3], "part": pd.Series(["", ""], dtype="string"),
                           "part_share": np.nan, "prompt": "Turdus merula", "contrast": "siblings"})
    assert describe_traits(traits, "Turdus merula") == ("Turdus merula: head 3: upper left of the image, spread 0.12 "
                                                        "(90% of images), head 5: lower centre of the image, spread "
                                                        "0.30 (60% of images)")
    assert [image_region(x, y) for x, y in ((0.5, 0.5), (1.0, 0.0), (0.0, 0.5), (0.99, 1.0))] == [
        "centre", "upper right", "left", "lower right"]


def test_a_folder_named_like_an_image_is_rejected_with_the_reason(tmp_path):
    folder = tmp_path / "photo.png"
    folder.mkdir()
    assert check_image(str(folder)) == "not an image: a folder"


# ----------------------------------------------------------------------------------------------------- helpers
def tree_config(tmp_path, root, name="user"):
    (tmp_path / "taxonomy.csv").write_text(TAXONOMY)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"dataset: {name}\nresults: {tmp_path / 'results'}\nranks: {RANKS}\n"
                    f"data: {{synthetic: null, images: '{root}', taxonomy: '{tmp_path / 'taxonomy.csv'}'}}\n")
    return str(path)


def output(out):
    return out.stdout + out.stderr


def dry(config, target):
    return output(snakemake(target, "--configfile", config, "-n"))


def jobs_of(text):
    return re.findall(r"^(?:local)?rule (\w+):$", text, flags=re.M)


def stack_frames(out):
    """Python stack-frame lines in Snakemake's output."""
    return re.findall(r'^\s*File ".*", line \d+', output(out), flags=re.M)



# -------------------------------------------------------------------------------- errors met while jobs are planned
@pytest.mark.parametrize("folder", ["validation", "Train"])
def test_a_split_folder_named_otherwise_stops_the_plan_with_one_line(tmp_path, folder):
    """Found while Snakemake plans the jobs (the images' fingerprint): the message alone, no stack frames."""
    root = tree(tmp_path / "images")
    picture(root / folder / "Sp a1" / "0.png")
    out = snakemake("--configfile", tree_config(tmp_path, root), "-n", check=False)
    assert out.returncode and f"DatasetError: {root / folder}: split folders must be named" in output(out)
    assert not stack_frames(out) and "Traceback" not in output(out)


def test_a_manifest_row_with_another_split_stops_the_plan_with_one_line(tmp_path):
    root = tree(tmp_path / "images")
    rows = [f"{split}/{species}/0.png,{'validation' if k == 1 else split},Ordo A,Genus a,{species}"
            for k, (split, species) in enumerate([("train", "Sp a1"), ("train", "Sp a2"), ("test", "Sp a1")])]
    (root / "manifest.csv").write_text("path,split,order,genus,species\n" + "\n".join(rows) + "\n")
    config = tmp_path / "manifest.yaml"
    config.write_text(f"dataset: listed\nresults: {tmp_path / 'results'}\nranks: {RANKS}\n"
                      f"data: {{synthetic: null, manifest: '{root / 'manifest.csv'}'}}\n")
    out = snakemake("--configfile", str(config), "-n", check=False)
    assert out.returncode and f"{root / 'manifest.csv'}: row 3 has split 'validation'" in output(out)
    assert not stack_frames(out) and "Traceback" not in output(out)


def test_a_demo_setting_the_generator_cannot_honour_is_a_config_error(tmp_path):
    bad = tmp_path / "wide.yaml"
    bad.write_text("data: {synthetic: {families_per_order: 25}}\n")
    out = snakemake("--configfile", str(bad), "--config", f"results={tmp_path}", "-n", check=False)
    assert out.returncode and "data.synthetic.families_per_order: 25 is greater than the maximum of 24" in output(out)
    assert not stack_frames(out) and "Traceback" not in output(out)
