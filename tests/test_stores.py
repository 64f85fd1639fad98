"""The stores of attention.h5 and saliency.h5: what the writer writes, the reader gives back (tiny arrays, no model)."""

import h5py
import numpy as np
import pytest

from taxotrait.attention_store import AttentionFile, write_attention
from taxotrait.saliency_store import read_saliency, write_saliency

ATTRS = {"rank": "species", "class_names": ["a b", "c", "d"], "grid": (2, 3), "heads": 2, "img_size": 32,
         "contrast": "siblings"}


def attention_rows(n: int, slots: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image_ids": [f"img ü {i}" for i in range(n)], "labels": rng.integers(0, 3, n),
            "predictions": rng.integers(0, 3, n), "scores": rng.normal(size=(n, slots)).astype(np.float32),
            "classes": rng.integers(-1, 3, (n, slots)),
            "attention": rng.random((n, slots, 2, 2, 3)).astype(np.float16)}


def test_attention_written_in_batches_reads_back(tmp_path):
    rows = attention_rows(5)
    with write_attention(tmp_path / "attention.h5", 5, 3, ATTRS) as writer:
        for batch in (slice(0, 2), slice(2, 5)):
            writer.write(*(np.asarray(v)[batch] for v in rows.values()))
    with AttentionFile(tmp_path / "attention.h5") as attention:
        assert attention.image_ids.tolist() == rows["image_ids"]
        np.testing.assert_array_equal(attention.labels, rows["labels"])
        np.testing.assert_array_equal(attention.predictions, rows["predictions"])
        np.testing.assert_array_equal(attention.classes, rows["classes"])
        np.testing.assert_array_equal(attention.correct, rows["labels"] == rows["predictions"])
        assert (attention.rank, attention.class_names, attention.grid, attention.heads, attention.img_size) == (
            "species", ["a b", "c", "d"], (2, 3), 2, 32)
        assert attention.row_of["img ü 3"] == 3
        maps = attention.maps(4)
        assert maps.dtype == np.float32
        np.testing.assert_array_equal(maps, rows["attention"][4].astype(np.float32))
    with h5py.File(tmp_path / "attention.h5") as h5:  # the documented layout
        assert h5["attention"].dtype == np.float16 and h5["attention"].chunks == (1, 3, 2, 2, 3)
        assert h5["attention"].compression == "gzip" and h5["attention"].shuffle and h5["scores"].dtype == np.float32
        np.testing.assert_array_equal(h5["scores"][:], rows["scores"])
        np.testing.assert_array_equal(h5["attention"][:], rows["attention"])  # through HDF5's own filters
        assert str(h5.attrs["contrast"]) == "siblings"


def test_an_attention_file_missing_rows_is_not_written(tmp_path):
    rows = attention_rows(2)
    with pytest.raises(ValueError, match="expected 3 images, got 2"):
        with write_attention(tmp_path / "attention.h5", 3, 3, ATTRS) as writer:
            writer.write(*rows.values())
    with pytest.raises(ValueError, match="expected 1 images, got more"):
        with write_attention(tmp_path / "attention.h5", 1, 3, ATTRS) as writer:
            writer.write(*rows.values())
    assert list(tmp_path.iterdir()) == []


def test_saliency_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    maps = rng.random((4, 2, 2, 2, 3)).astype(np.float32)
    label, prediction = np.array([0, 1, 2, 1]), np.array([0, 2, 2, 1])
    attrs = {"rank": "genus", "methods": ["prompt_cam_traits", "rollout"], "grid": (2, 3), "img_size": 32,
             "class_names": ["a", "b", "c"], "prompt_cam_top1": 0.75, "probe_top1": 0.5}
    write_saliency(tmp_path / "saliency.h5", ["x", "y ñ", "z", "w"], label, prediction, np.array([1, 1, 2, 0],
                   dtype=np.int32), maps, attrs)
    sal = read_saliency(tmp_path / "saliency.h5")
    assert sal["image_id"].tolist() == ["x", "y ñ", "z", "w"]
    np.testing.assert_array_equal(sal["maps"], maps)
    np.testing.assert_array_equal(sal["label"], label)
    np.testing.assert_array_equal(sal["prediction"], prediction)
    assert sal["probe_prediction"].dtype == np.int64 and sal["probe_prediction"].tolist() == [1, 1, 2, 0]
    assert sal["methods"] == ["prompt_cam_traits", "rollout"] and sal["rank"] == "genus"
    assert tuple(sal["grid"]) == (2, 3) and sal["prompt_cam_top1"] == 0.75 and sal["probe_top1"] == 0.5
    assert [str(c) for c in sal["class_names"]] == ["a", "b", "c"]


def many_names(n: int) -> list[str]:
    return [f"Genus{i // 5} species-{i} ü" for i in range(n)]


def test_attention_store_holds_20000_class_names(tmp_path):
    """Class names are a dataset, not an attribute (whose 64 KiB header limit holds about 4,000 of them)."""
    names, rows = many_names(20_000), attention_rows(4)
    with write_attention(tmp_path / "attention.h5", 4, 3, {**ATTRS, "class_names": names}, threads=2) as writer:
        writer.write(*rows.values())
    with AttentionFile(tmp_path / "attention.h5") as attention:
        assert attention.class_names == names and attention.index_of[names[19_999]] == 19_999
        np.testing.assert_array_equal(attention.maps(3), rows["attention"][3].astype(np.float32))


def test_saliency_store_holds_20000_class_names(tmp_path):
    names = many_names(20_000)
    attrs = {"rank": "species", "methods": ["rollout"], "grid": (2, 3), "img_size": 32, "class_names": names}
    write_saliency(tmp_path / "saliency.h5", ["x"], np.array([19_999]), np.array([0]), np.array([1]),
                   np.zeros((1, 1, 2, 2, 3), np.float32), attrs)
    sal = read_saliency(tmp_path / "saliency.h5")
    assert sal["class_names"] == names and sal["rank"] == "species" and sal["label"].tolist() == [19_999]


def test_files_with_class_names_as_an_attribute_still_read(tmp_path):
    """Stores written before class names became a dataset keep them as an attribute."""
    rows = attention_rows(2)
    with write_attention(tmp_path / "attention.h5", 2, 3, ATTRS) as writer:
        writer.write(*rows.values())
    write_saliency(tmp_path / "saliency.h5", ["x"], np.array([0]), np.array([0]), np.array([1]),
                   np.zeros((1, 1, 2, 2, 3), np.float32), {"rank": "genus", "methods": ["rollout"], "class_names": ["a"]})
    for name, names in (("attention.h5", ATTRS["class_names"]), ("saliency.h5", ["a"])):
        with h5py.File(tmp_path / name, "r+") as h5:  # the old layout
            del h5["class_names"]
            h5.attrs["class_names"] = names
    with AttentionFile(tmp_path / "attention.h5") as attention:
        assert attention.class_names == ATTRS["class_names"]
    assert read_saliency(tmp_path / "saliency.h5")["class_names"] == ["a"]


def test_a_failing_attention_write_leaves_no_file(tmp_path):
    """Maps of the wrong shape (which a raw chunk write would store as garbage) stop the writer; no file appears."""
    rows = attention_rows(2)
    rows["attention"] = rows["attention"][:, :2]
    with pytest.raises(ValueError, match=r"attention maps of shape \(2, 2, 2, 2, 3\), expected \(2, 3, 2, 2, 3\)"):
        with write_attention(tmp_path / "attention.h5", 2, 3, ATTRS) as writer:
            writer.write(*rows.values())
    assert list(tmp_path.iterdir()) == []
