"""The saliency store: ``<rank>/saliency.h5``, its writer (`write_saliency`) and its reader (`read_saliency`).
Every other module reads and writes saliency.h5 through these two.

Layout: datasets ``image_id`` [n] str (stratified order: any prefix is stratified), ``label``, ``prediction``
(Prompt-CAM's), ``probe_prediction`` [n] int64, ``maps`` [n, methods, 2, h, w] float32, gzip-compressed (slot 0:
true class, 1: predicted class); attributes rank, methods, grid, img_size, prompt_cam_top1, probe_top1
(top-1 on the whole attention split), slots, device (where the maps were made), contrast; ``class_names`` [C] str is
a dataset (`taxotrait.hdf5`; an attribute in files written before 2026-12-04).
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from .hdf5 import read_attributes, write_attributes
from .io import atomic_write


def write_saliency(path: str | os.PathLike, image_ids, label: np.ndarray, prediction: np.ndarray,
                   probe_prediction: np.ndarray, maps: np.ndarray, attrs: dict) -> None:
    """Write saliency.h5 at `path` atomically: the datasets and attributes `attrs` of the module docstring."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("image_id", data=np.array(image_ids, dtype=object), dtype=h5py.string_dtype())
        h5["label"], h5["prediction"], h5["probe_prediction"] = label, prediction, probe_prediction.astype(np.int64)
        h5.create_dataset("maps", data=maps, compression="gzip", shuffle=True)
        write_attributes(h5, attrs)


def read_saliency(path: str | os.PathLike) -> dict:
    """The datasets and attributes of the saliency.h5 at `path`, by name (``methods`` as a list of str)."""
    with h5py.File(path, "r") as h5:
        out = {key: h5[key][:] for key in ("label", "prediction", "probe_prediction", "maps")}
        out["image_id"] = h5["image_id"].asstr()[:]
        out.update(read_attributes(h5))
        out["methods"] = [str(m) for m in out["methods"]]
    return out
