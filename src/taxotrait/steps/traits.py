"""Steps of workflow/rules/traits.smk: the trait table of each rank and the coarse-to-fine table of every species."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from ..dataset import read_manifest_table
from ..groundtruth import ground_truth_columns
from ..io import write_parquet
from ..traits import hierarchy_traits as hierarchy_table
from ..traits import key_entries, name_heads, rank_traits


def named_heads(path, manifest: pd.DataFrame, settings: Mapping) -> pd.DataFrame:
    """The heads.parquet at `path`, each trait head named after the ground truth's part it points to (where the
    dataset has some; settings: `augment.resize`, `backbone.img_size`, `evaluation.parts`)."""
    return name_heads(pd.read_parquet(path), manifest, settings["augment"]["resize"], settings["backbone"]["img_size"],
                      settings["evaluation"]["parts"])


def traits(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """A rank's heads.parquet -> its traits.parquet and its key entries (traits named as in `named_heads`)."""
    manifest_path = inputs["manifest"]
    manifest = read_manifest_table(manifest_path, ground_truth_columns(manifest_path, settings["evaluation"]["parts"]))
    heads = named_heads(inputs["heads"], manifest, settings)
    write_parquet(rank_traits(heads), outputs["traits"])
    write_parquet(key_entries(heads), outputs["key_entries"])


def hierarchy_traits(inputs: Mapping, outputs: Mapping, settings: Mapping) -> None:
    """Every rank's heads.parquet (in the order of `ranks`) + the manifest -> hierarchy_traits.parquet."""
    manifest_path, ranks = inputs["manifest"], list(settings["ranks"])
    truth_columns = ground_truth_columns(manifest_path, settings["evaluation"]["parts"])
    manifest = read_manifest_table(manifest_path, [*truth_columns, ranks[-1]])
    heads = [named_heads(path, manifest, settings) for path in inputs["heads"]]
    write_parquet(hierarchy_table(heads, manifest, ranks), outputs["hierarchy"])
