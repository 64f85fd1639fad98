"""Dataset preparation: tree and manifest layouts, taxonomy checks, rejects, class tables."""

import pandas as pd
import pytest
from PIL import Image

from taxotrait.dataset import (
    DatasetError, class_names, labels, prepare_dataset, read_manifest, read_taxonomy, scan_image_tree,
)

RANKS = ["order", "genus", "species"]
TAXONOMY = "order,genus,species\nOrdo A,Genus a,Sp a1\nOrdo A,Genus a,Sp a2\nOrdo B,Genus b,Sp b1\n"


def write_tree(root, species=("Sp a1", "Sp a2", "Sp b1"), per_split=2):
    for split in ("train", "test"):
        for name in species:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_split):
                Image.new("RGB", (20, 16), (i * 40, 80, 120)).save(folder / f"img é {i}.png")
    return root


def test_image_tree_with_taxonomy(tmp_path):
    (tmp_path / "taxonomy.csv").write_text(TAXONOMY)
    images = scan_image_tree(write_tree(tmp_path / "images")).rename(columns={"species": "species"})
    manifest, classes, rejects = prepare_dataset(images, read_taxonomy(tmp_path / "taxonomy.csv", RANKS), RANKS, "tree")
    assert len(manifest) == 12 and rejects.empty
    assert list(manifest.columns[:6]) == ["image_id", "path", "split", "order", "genus", "species"]
    assert manifest["image_id"].is_unique and "train/Sp a1/img é 0" in set(manifest["image_id"])
    assert (manifest.loc[manifest["species"] == "Sp b1", "order"] == "Ordo B").all()
    genus = classes[classes["rank"] == "genus"]
    assert genus["taxon"].tolist() == ["Genus a", "Genus b"] and genus["parent"].tolist() == ["Ordo A", "Ordo B"]
    assert genus["n_train"].tolist() == [4, 2] and genus["n_test"].tolist() == [4, 2]
    assert class_names(classes, "order") == ["Ordo A", "Ordo B"]
    assert labels(manifest, classes, "species").max() == 2


def test_manifest_with_rank_columns_and_relative_paths(tmp_path):
    write_tree(tmp_path / "images")
    rows = [f"images/{s}/Sp a{i}/img é 0.png,{s},Ordo A,Genus a,Sp a{i},masks/{i}.npz"
            for s in ("train", "test") for i in (1, 2)]
    (tmp_path / "m.csv").write_text("path,split,order,genus,species,mask_path\n" + "\n".join(rows) + "\n")
    table = read_manifest(tmp_path / "m.csv")
    assert table["path"].map(lambda p: p.startswith(str(tmp_path))).all()
    assert table["mask_path"].iloc[0] == str(tmp_path / "masks/1.npz")
    manifest, classes, _ = prepare_dataset(table, None, RANKS, "m.csv")
    assert "mask_path" in manifest.columns and len(classes) == 4


def test_corrupt_images_are_rejected_or_stop_the_run(tmp_path):
    (tmp_path / "taxonomy.csv").write_text(TAXONOMY)
    root = write_tree(tmp_path / "images")
    (root / "train" / "Sp a1" / "img é 0.png").write_bytes(b"\x89PNG broken")
    images = scan_image_tree(root)
    taxonomy = read_taxonomy(tmp_path / "taxonomy.csv", RANKS)
    with pytest.raises(DatasetError, match=r"1 of 12 images rejected.*img é 0.png"):
        prepare_dataset(images, taxonomy, RANKS, "tree")
    manifest, _, rejects = prepare_dataset(images, taxonomy, RANKS, "tree", max_reject_fraction=0.1)
    assert len(manifest) == 11 and rejects["reason"].tolist() == ["not an image: PIL cannot identify its format"]
    assert rejects["path"].iloc[0].endswith("img é 0.png")


@pytest.mark.parametrize("table,message", [
    ("order,genus,species\nA,g1,s1\nB,g1,s2\n", "genus 'g1' has several parents"),
    ("order,species\nA,s1\n", r"rank column\(s\) \['genus'\] missing"),
    ("order,genus,species\nA,g1,s1\nA,g2,s1\n", "species 's1' has rows with different ranks"),
    ("order,genus,species\nA,g1,s1\nA,,s2\n", r"empty genus in row\(s\) \[3\]"),
    ("order,genus,species\nA,A,s1\n", "used at ranks order and genus"),
])
def test_inconsistent_taxonomy_names_the_row(tmp_path, table, message):
    (tmp_path / "tax.csv").write_text(table)
    with pytest.raises(DatasetError, match=message):
        read_taxonomy(tmp_path / "tax.csv", RANKS)


def test_species_without_taxonomy_or_training_images(tmp_path):
    (tmp_path / "taxonomy.csv").write_text(TAXONOMY)
    taxonomy = read_taxonomy(tmp_path / "taxonomy.csv", RANKS)
    images = scan_image_tree(write_tree(tmp_path / "a", species=("Sp a1", "Sp zz")))
    with pytest.raises(DatasetError, match="without a taxonomy row.*Sp zz"):
        prepare_dataset(images, taxonomy, RANKS, "tree")
    images = scan_image_tree(write_tree(tmp_path / "b"))
    images = images[~((images["species"] == "Sp b1") & (images["split"] == "train"))]
    with pytest.raises(DatasetError, match=r"species 'Sp b1' has no training images \(usable: \{'test': 2\}\)"):
        prepare_dataset(images, taxonomy, RANKS, "tree")


def test_bad_manifest_rows(tmp_path):
    (tmp_path / "m.csv").write_text("path,split,species\na.png,training,s\n")
    with pytest.raises(DatasetError, match="row 2 has split 'training'"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("file,split\n")
    with pytest.raises(DatasetError, match="n.csv: required column 'path'"):
        read_manifest(tmp_path / "n.csv")
    dup = pd.DataFrame({"path": ["x.png", "y.png"], "split": "train", "species": "Sp a1", "image_id": ["a", "a"]})
    (tmp_path / "taxonomy.csv").write_text(TAXONOMY)
    with pytest.raises(DatasetError, match="duplicate image_id 'a'"):
        prepare_dataset(dup, read_taxonomy(tmp_path / "taxonomy.csv", RANKS), RANKS, "m")


def test_images_are_checked_in_worker_processes_with_the_same_tables(tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    from taxotrait import dataset

    (tmp_path / "taxonomy.csv").write_text(TAXONOMY)
    root = write_tree(tmp_path / "images", per_split=4)
    (root / "train" / "Sp a1" / "img é 0.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (40, 40)).save(root / "test" / "Sp b1" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # data.max_image_pixels: the workers reject big.png too
    pools = []

    class RecordingPool(ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(dataset, "ProcessPoolExecutor", RecordingPool)
    images, taxonomy = scan_image_tree(root), read_taxonomy(tmp_path / "taxonomy.csv", RANKS)
    alone = prepare_dataset(images, taxonomy, RANKS, "tree", max_reject_fraction=0.1, progress=False)
    assert pools == []
    pooled = prepare_dataset(images, taxonomy, RANKS, "tree", max_reject_fraction=0.1, progress=False, workers=2)
    assert pools == [2]
    for one, two in zip(alone, pooled):  # manifest, classes, rejects: the same rows in the same order
        pd.testing.assert_frame_equal(one, two)
    assert len(alone[0]) == 23 and sorted(r.split(":")[0] for r in alone[2]["reason"]) == ["not an image", "too large"]


def test_a_job_uses_its_threads_at_most_the_cpus_it_is_given(monkeypatch):
    import os

    from taxotrait.dataset import job_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # e.g. SLURM's cpus_per_gpu
    assert [job_cpus(threads) for threads in (8, 2, 1, 0)] == [3, 2, 1, 1]
