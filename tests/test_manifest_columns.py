"""The steps read only the manifest columns (and splits) they use: `read_manifest_table`, and cache_tokens' images the
same as from the whole table."""

import pandas as pd
import pytest

from taxotrait.dataset import read_manifest_table
from taxotrait.errors import DatasetError
from taxotrait.groundtruth import ground_truth_columns
from taxotrait.steps import cache as cache_step

SPLIT_CYCLE = ["train", "val", "train", "test", "train", "train", "val"]


@pytest.fixture
def manifest(tmp_path):
    """manifest.parquet of 500 images, the splits interleaved, in row groups of 64 rows (batches filtered one
    by one); returns (path, the table written)."""
    n = 500
    table = pd.DataFrame({"image_id": [f"img_{i:03d}" for i in range(n)],
                          "path": [f"/data/{i % 5}/img_{i:03d}.png" for i in range(n)],
                          "split": [SPLIT_CYCLE[i % len(SPLIT_CYCLE)] for i in range(n)],
                          "genus": [f"g{i % 3}" for i in range(n)], "species": [f"s{(i * 7) % 11}" for i in range(n)],
                          "mask_path": [f"/masks/img_{i:03d}.npz" for i in range(n)],
                          "flipped": [i % 2 == 0 for i in range(n)],
                          "angle": [None if i % 9 else 0.5 * i for i in range(n)]})
    path = tmp_path / "manifest.parquet"
    table.to_parquet(path, index=False, row_group_size=64)
    return path, table


def test_read_manifest_table_reads_the_columns_and_splits_asked_for_in_file_order(manifest, tmp_path):
    path, table = manifest
    pd.testing.assert_frame_equal(read_manifest_table(path), pd.read_parquet(path))  # the same types
    pd.testing.assert_frame_equal(read_manifest_table(path), table)
    table.set_index(table.index + 7).to_parquet(tmp_path / "indexed.parquet")  # an index stored: 0..n-1 all the same
    pd.testing.assert_frame_equal(read_manifest_table(tmp_path / "indexed.parquet", ["path"], ["val"]),
                                  table.loc[table["split"] == "val", ["path"]].reset_index(drop=True))
    rows = read_manifest_table(path, ["path", "image_id"], ["val", "test"])
    expected = table.loc[table["split"].isin(["val", "test"]), ["path", "image_id"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, expected)
    assert list(rows.index) == list(range(len(expected)))
    assert read_manifest_table(path, ["species"], []).empty
    assert list(read_manifest_table(path, splits=["train"]).columns) == list(table.columns)


def test_a_missing_column_names_the_file_and_the_column(manifest, tmp_path):
    path, table = manifest
    with pytest.raises(DatasetError, match=r"manifest\.parquet: no column 'order'"):
        read_manifest_table(path, ["path", "order"])
    older = tmp_path / "older.parquet"
    table.drop(columns="split").to_parquet(older, index=False)
    with pytest.raises(DatasetError, match=r"older\.parquet: no column 'split'"):
        read_manifest_table(older, ["path"], ["train"])


def test_ground_truth_columns_are_those_the_manifest_has(manifest, tmp_path):
    path, table = manifest
    assert ground_truth_columns(path) == ["image_id", "mask_path"]
    without_masks = tmp_path / "plain.parquet"
    table.drop(columns="mask_path").to_parquet(without_masks, index=False)
    assert ground_truth_columns(without_masks, parts=tmp_path) == ["image_id", "path"]


@pytest.mark.parametrize("kind, chosen", [("train", lambda split: split == "train"),
                                          ("eval", lambda split: split != "train")])
def test_cache_tokens_caches_the_same_images_in_the_same_order(manifest, monkeypatch, kind, chosen):
    path, table = manifest
    cached = {}
    monkeypatch.setattr(cache_step, "new_model", lambda settings, names: "probe")
    monkeypatch.setattr(cache_step, "model_step_device", lambda settings: "cpu")
    monkeypatch.setattr(cache_step, "build_token_cache", lambda probe, paths, out, **kw: cached.update(paths=paths))
    settings = {"augment": {"resize": 36, "crop": True, "hflip": True, "views": 2}, "train": {"seed": 0},
                "backbone": {"precision": "fp32"}}
    cache_step.cache_tokens(kind, path, "tokens.npy", settings)
    assert cached["paths"] == table.loc[table["split"].map(chosen), "path"].tolist()  # the whole table's selection
