"""The attention store: ``<rank>/attention.h5``, its writer (`write_attention`, batch by batch) and its reader
(`AttentionFile`). Every other module reads and writes attention.h5 through these two.

Layout (datasets along N images, written batch by batch so memory does not grow with N):

- ``image_id`` [N] str, ``label`` [N] int64, ``prediction`` [N] int64 (the best of the true class's rivals: its
  siblings under contrast 'siblings', i.e. the prediction given the true parent; every class under 'rank'),
  ``logits`` [N, C] float32
- ``classes`` [N, K] int64: the class of each map: slot 0 the true class, slot 1 the predicted class, then extra
  classes (siblings of the true class in the taxonomy; -1 where there are fewer)
- ``attention`` [N, K, heads, h, w] float16: last-block attention of those class prompts over the patch grid,
  chunked one image per chunk, gzip-compressed
- attributes: rank, class_names, grid (h, w), heads, backbone, backbone_digest, variant, prompt_depth, img_size,
  class_slots ("true, predicted, extra..."), contrast ("siblings" or "rank"), device (where the maps were
  computed: the model's device)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from .io import atomic_write


class AttentionWriter:
    """The datasets of an attention.h5 being written, filled batch by batch in image order (`write_attention`)."""

    def __init__(self, h5: h5py.File, num_images: int, num_slots: int):
        num_classes, heads = len(h5.attrs["class_names"]), int(h5.attrs["heads"])
        grid = tuple(int(g) for g in h5.attrs["grid"])
        self.num_images, self.written = num_images, 0
        self.image_ids = h5.create_dataset("image_id", (num_images,), dtype=h5py.string_dtype())
        self.labels = h5.create_dataset("label", (num_images,), dtype="int64")
        self.predictions = h5.create_dataset("prediction", (num_images,), dtype="int64")
        self.logits = h5.create_dataset("logits", (num_images, num_classes), dtype="float32", chunks=(1, num_classes))
        self.classes = h5.create_dataset("classes", (num_images, num_slots), dtype="int64")
        self.attention = h5.create_dataset(
            "attention", (num_images, num_slots, heads, *grid), dtype="float16",
            chunks=(1, num_slots, heads, *grid), compression="gzip", compression_opts=4, shuffle=True,
        )

    def write(self, image_ids, labels: np.ndarray, predictions: np.ndarray, logits: np.ndarray, classes: np.ndarray,
              attention: np.ndarray) -> None:
        """The next len(image_ids) rows: labels, predictions [B], logits [B, C], classes [B, K] and their maps
        attention [B, K, heads, h, w] (stored as float16)."""
        start, stop = self.written, self.written + len(image_ids)
        if stop > self.num_images:
            raise ValueError(f"expected {self.num_images} images, got more")
        self.image_ids[start:stop] = image_ids
        self.labels[start:stop] = labels
        self.predictions[start:stop] = predictions
        self.logits[start:stop] = logits
        self.classes[start:stop] = classes
        self.attention[start:stop] = attention
        self.written = stop


@contextmanager
def write_attention(path: str | os.PathLike, num_images: int, num_slots: int, attrs: dict) -> Iterator[AttentionWriter]:
    """Write attention.h5 at `path` atomically: `attrs` are its attributes (see the module docstring; their
    class_names, heads and grid give the datasets' shapes), the yielded writer fills its `num_images` rows of
    `num_slots` maps. The file appears only when the block succeeds with every row written (ValueError otherwise)."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(attrs)
        writer = AttentionWriter(h5, num_images, num_slots)
        yield writer
        if writer.written != num_images:
            raise ValueError(f"expected {num_images} images, got {writer.written}")


class AttentionFile:
    """Read access to an attention.h5 (layout in the module docstring); use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.h5 = h5py.File(self.path, "r")
        attrs = self.h5.attrs
        self.rank = str(attrs["rank"])
        self.class_names = [str(c) for c in attrs["class_names"]]
        self.img_size = int(attrs["img_size"])
        self.heads = int(attrs["heads"])
        self.grid = tuple(int(g) for g in attrs["grid"])
        self.image_ids = self.h5["image_id"].asstr()[:]
        self.labels = self.h5["label"][:]
        self.predictions = self.h5["prediction"][:]
        self.classes = self.h5["classes"][:]
        self.correct = self.labels == self.predictions
        self.row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        self.index_of = {name: i for i, name in enumerate(self.class_names)}

    def __enter__(self) -> "AttentionFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.h5.close()

    def correct_rows(self, taxon: str) -> np.ndarray:
        """Rows of the correctly classified images of `taxon`, in file order."""
        index = self.index_of.get(taxon)
        if index is None:
            return np.array([], dtype=np.int64)
        return np.flatnonzero((self.labels == index) & self.correct)

    def maps(self, row: int) -> np.ndarray:
        """Maps of one image, [K slots, heads, h, w] float32 (slot 0: true class, 1: predicted, then siblings)."""
        return self.h5["attention"][int(row)].astype(np.float32)

    def head_maps(self, row: int, prompts: list[str], heads: list[int]) -> np.ndarray:
        """[n, h, w]: on one image, head heads[i] of the prompt of class prompts[i] (a trait table's prompt and head
        columns); zeros where attention.h5 holds no map of that prompt for the image (see attention.extra_classes)."""
        maps = self.maps(row)
        slot_of = {int(c): slot for slot, c in reversed(list(enumerate(self.classes[int(row)]))) if c >= 0}
        out = np.zeros((len(heads), *maps.shape[-2:]), dtype=np.float32)
        for i, (prompt, head) in enumerate(zip(prompts, heads)):
            slot = slot_of.get(self.index_of.get(str(prompt), -1))
            if slot is not None:
                out[i] = maps[slot, int(head)]
        return out
