"""Dataset preparation: tree and manifest layouts, taxonomy checks, rejects, class tables."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from taxotrait import dataset
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


def chunked_manifest(tmp_path, n_species=5, per_split=3):
    """A manifest CSV of `n_species` species with train and test images, one of them corrupt."""
    root = write_tree(tmp_path / "images", species=[f"Sp {i}" for i in range(n_species)], per_split=per_split)
    (root / "test" / "Sp 3" / "img é 1.png").write_bytes(b"\x89PNG broken")
    rows = [f"images/{split}/Sp {i}/img é {k}.png,{split},Ordo {i // 2 % 2},Genus {i // 2},Sp {i},note {k}"
            for i in range(n_species) for split in ("train", "test") for k in range(per_split)]
    (tmp_path / "m.csv").write_text("path,split,order,genus,species,note\n" + "\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def prepared_in_chunks(tmp_path, manifest, monkeypatch, chunk_rows, name):
    """prepare_tables on `manifest` read `chunk_rows` rows at a time, with row groups of `chunk_rows` + 1 rows."""
    monkeypatch.setattr(dataset, "CHUNK_ROWS", chunk_rows + 1)
    outputs = {table: tmp_path / name / f"{table}.parquet" for table in ("manifest", "classes", "rejects")}
    dataset.prepare_tables(dataset.iter_manifest(manifest, chunk_rows), None, RANKS, str(manifest), outputs,
                           max_reject_fraction=0.1, progress=False)
    assert not list((tmp_path / name).glob(".*")), "a temporary file is left beside the tables"
    return outputs


def test_prepare_in_chunks_writes_the_tables_of_the_whole_listing(tmp_path, monkeypatch):
    """The streamed prepare step (listing spooled, images checked and tables written a chunk at a time) gives the
    tables of the listing read whole, in row groups of bounded size."""
    manifest = chunked_manifest(tmp_path)
    whole = prepare_dataset(read_manifest(manifest), None, RANKS, str(manifest), max_reject_fraction=0.1,
                            progress=False)
    outputs = prepared_in_chunks(tmp_path, manifest, monkeypatch, 2, "chunks")
    assert pq.ParquetFile(outputs["manifest"]).metadata.num_row_groups == 10  # 29 images, 3 rows per group
    for table, expected in zip(outputs.values(), whole):
        pd.testing.assert_frame_equal(pd.read_parquet(table), expected)
    assert whole[0]["note"].iloc[0] == "note 0" and len(whole[0]) == 29
    assert whole[2]["path"].str.endswith("test/Sp 3/img é 1.png").tolist() == [True]
    classes = whole[1]
    assert classes.loc[classes["rank"] == "species", "n_test"].tolist() == [3, 3, 3, 2, 3]


def test_duplicates_found_across_chunks_and_hash_collisions_ignored(tmp_path, monkeypatch):
    manifest = chunked_manifest(tmp_path)
    lines = manifest.read_text().splitlines()
    (tmp_path / "dup.csv").write_text("\n".join([*lines, lines[2]]) + "\n")  # row 3 again, 30 rows later
    with pytest.raises(DatasetError, match=r"img é 1.png' is listed more than once \(rows \[3, 32\]"):
        prepared_in_chunks(tmp_path, tmp_path / "dup.csv", monkeypatch, 4, "dup")
    whole = prepared_in_chunks(tmp_path, manifest, monkeypatch, 4, "whole")
    monkeypatch.setattr(dataset, "_hash", lambda values: np.zeros(len(values), np.uint64))  # every hash the same
    colliding = prepared_in_chunks(tmp_path, manifest, monkeypatch, 4, "colliding")
    for table in whole:
        pd.testing.assert_frame_equal(pd.read_parquet(colliding[table]), pd.read_parquet(whole[table]))


def test_table_read_in_chunks_keeps_late_unnamed_columns_and_finds_late_encoding(tmp_path, caplog):
    """A column without a header kept when a row far down fills it; a Windows-1252 byte past the first block of the
    encoding check named by its line."""
    rows = [f"Sp {i},Genus of a rather long name {i},," for i in range(40_000)]  # 1.8 MB: blocks are 1 MB
    rows[35_000] = "Sp 35000,,late,"
    rows[30_000] = "Sp caf\xe9,,,"
    (tmp_path / "t.csv").write_bytes(("species,genus,,\n" + "\n".join(rows) + "\n").encode("cp1252"))
    with caplog.at_level("WARNING"):
        chunks = list(dataset.iter_table(tmp_path / "t.csv", chunk_rows=7_000))
    assert "line 30002 reads 'Sp café,,,'" in caplog.text
    table = pd.concat(chunks)
    assert len(chunks) == 6 and list(table.columns) == ["species", "genus", "Unnamed: 2"]
    assert table.loc[35_000, "Unnamed: 2"] == "late" and table.loc[30_000, "species"] == "Sp café"


def test_taxa_per_rank_reads_each_route_in_chunks(tmp_path):
    """Counted before any job runs, from the manifest in chunks: with rank columns, with a taxonomy table, and from
    an image tree's folders; the same counts."""
    manifest = chunked_manifest(tmp_path)
    (tmp_path / "taxonomy.csv").write_text("order,genus,species\n" + "".join(
        f"Ordo {i // 2 % 2},Genus {i // 2},Sp {i}\n" for i in range(6)))  # Sp 5 has no images
    species_only = tmp_path / "species_only.csv"
    pd.read_csv(manifest)[["path", "split", "species"]].to_csv(species_only, index=False)
    expected = {"order": 2, "genus": 3, "species": 5}
    assert dataset.taxa_per_rank({"manifest": str(manifest)}, RANKS) == expected
    assert dataset.taxa_per_rank({"manifest": str(species_only), "taxonomy": str(tmp_path / "taxonomy.csv")},
                                 RANKS) == expected
    assert dataset.taxa_per_rank({"images": str(tmp_path / "images"), "taxonomy": str(tmp_path / "taxonomy.csv")},
                                 RANKS) == expected


def test_tree_fingerprint_digests_every_file_the_scan_lists(tmp_path):
    """The planning-time digest of an image tree (folder entries, one stat each) is the digest of the paths the
    prepare step's scan lists, non-images and empty folders included."""
    root = write_tree(tmp_path / "images")
    (root / "train" / "Sp a1" / "notes.txt").write_text("x")
    (root / "test" / "Sp b2").mkdir()
    listed = scan_image_tree(root)["path"]
    assert len(listed) == 14 and dataset.image_tree_fingerprint(root) == dataset.listing_digest(listed)
    assert dataset.image_tree_fingerprint(root) != dataset.listing_digest(listed[:-1])


def test_listing_edge_cases_keep_the_tables_consistent(tmp_path, caplog):
    """An empty species is an error naming its row; a user's column keeps its name whatever it is; a species whose
    training files are all lost is explained by its rejected image before its skipped files; every skipped file is
    counted; loose files with the same stem keep their suffixes in their ids."""
    manifest = chunked_manifest(tmp_path)
    lines = manifest.read_text().splitlines()
    (tmp_path / "empty.csv").write_text("\n".join([*lines[:4], lines[4].rsplit(",", 2)[0] + ",,x"]) + "\n")
    with pytest.raises(DatasetError, match=r"empty.csv: empty species in row\(s\) \[5\]"):
        prepare_dataset(read_manifest(tmp_path / "empty.csv"), None, RANKS, str(tmp_path / "empty.csv"),
                        progress=False)
    (tmp_path / "row.csv").write_text("\n".join(line + (",_row" if i == 0 else ",kept") for i, line in
                                                enumerate(lines)) + "\n")
    kept, _, _ = prepare_dataset(read_manifest(tmp_path / "row.csv"), None, RANKS, "row.csv", 0.1, progress=False)
    assert kept["_row"].eq("kept").all()

    root = write_tree(tmp_path / "tree", species=("Sp a1", "Sp a2", "Sp b1"))
    (root / "train" / "Sp a1" / "img é 0.png").write_bytes(b"broken")
    (root / "train" / "Sp a1" / "img é 1.png").unlink()
    (root / "train" / "Sp a1" / "a.txt").write_text("notes")
    for loose in ("a.md", "a.txt", "train/x.jpg", "train/x.png"):
        (root / loose).write_text("loose")
    outputs = {table: tmp_path / "out" / f"{table}.parquet" for table in ("manifest", "classes", "rejects")}
    taxonomy = read_taxonomy_text(tmp_path)
    with pytest.raises(DatasetError, match=r"'Sp a1' has no training images .*its 2 training files: e\.g\. "
                                           r".*img é 0.png: not an image"):
        dataset.prepare_tables(dataset.iter_image_tree(root), taxonomy, RANKS, "tree", outputs, 1.0, False)
    write_tree(tmp_path / "ok").joinpath("a.md").write_text("loose")
    (tmp_path / "ok" / "a.txt").write_text("loose")
    tally = dataset.prepare_tables(dataset.iter_image_tree(tmp_path / "ok"), taxonomy, RANKS, "ok", outputs, 0.1,
                                   False)
    assert (tally.files["skipped"], tally.files["taken"], tally.files["rejected"]) == (2, 12, 0)
    assert sorted(pd.read_parquet(outputs["rejects"])["image_id"]) == ["a.md", "a.txt"]


def read_taxonomy_text(tmp_path):
    (tmp_path / "taxonomy.csv").write_text(TAXONOMY)
    return read_taxonomy(tmp_path / "taxonomy.csv", RANKS)


def test_odd_table_files_are_named_errors_or_read_with_their_lines(tmp_path, caplog):
    """A UTF-16 file cut short is an error naming the file; a Windows-1252 file with old Mac line ends (CR) is read,
    the warning naming the line and quoting it alone."""
    (tmp_path / "u16.csv").write_bytes("species,genus\nSp a,G\n".encode("utf-16")[:-1])
    with pytest.raises(DatasetError, match=r"u16.csv: not valid UTF-16 text"):
        dataset.read_table(tmp_path / "u16.csv")
    rows = ["species,genus"] + [f"Sp {i},Genus {i}" for i in range(50)]
    rows[30] = "Sp caf\xe9,Genus 29"
    (tmp_path / "mac.csv").write_bytes("\r".join(rows).encode("cp1252") + b"\r")
    with caplog.at_level("WARNING"):
        table = dataset.read_table(tmp_path / "mac.csv")
    assert "line 31 reads 'Sp café,Genus 29'" in caplog.text and len(table) == 50
