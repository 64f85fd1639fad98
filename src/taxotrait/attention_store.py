"""The attention store: ``<rank>/attention.h5``, its writer (`write_attention`, batch by batch) and its reader
(`AttentionFile`). Every other module reads and writes attention.h5 through these two.

Layout (datasets along N images, written batch by batch so memory does not grow with N or with the classes):

- ``image_id`` [N] str, ``label`` [N] int64, ``prediction`` [N] int64 (the best of the true class's rivals: its
  siblings under contrast 'siblings', i.e. the prediction given the true parent; every class under 'rank')
- ``classes`` [N, K] int64: the class of each map: slot 0 the true class, slot 1 the predicted class, then extra
  classes (siblings of the true class in the taxonomy; -1 where there are fewer)
- ``scores`` [N, K] float32: the class score of each slot's class (NaN where the slot is -1)
- ``attention`` [N, K, heads, h, w] float16: last-block attention of those class prompts over the patch grid,
  chunked one image per chunk, shuffled and gzip-compressed (compressed by a pool of threads, `AttentionWriter`)
- ``class_names`` [C] str (`taxotrait.hdf5`; an attribute in files written before 2026-12-04)
- attributes: rank, grid (h, w), heads, backbone, backbone_digest, variant, prompt_depth, img_size,
  class_slots ("true, predicted, extra..."), contrast ("siblings" or "rank"), device (where the maps were
  computed: the model's device)
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from .hdf5 import read_attributes, write_attributes
from .io import atomic_write

GZIP_LEVEL = 4
PENDING_BATCHES = 4  # batches handed to the writer and not yet on disk: bounds the writer's memory


def shuffled_deflate(array: np.ndarray, level: int = GZIP_LEVEL) -> bytes:
    """One chunk as HDF5's shuffle and deflate (gzip) filters store it: the bytes of each element's position
    together, then zlib. zlib releases the GIL, so chunks compress in parallel threads."""
    size = array.dtype.itemsize
    return zlib.compress(np.ascontiguousarray(array).view(np.uint8).reshape(-1, size).T.tobytes(), level)


class AttentionWriter:
    """The datasets of an attention.h5 being written, filled batch by batch in image order (`write_attention`).

    `write` returns at once: the attention chunks are compressed by a pool of `threads` threads (a share of each
    batch per thread) and written in order
    by one more, so that the model computes the next batch meanwhile; at most PENDING_BATCHES batches wait."""

    def __init__(self, h5: h5py.File, num_images: int, num_slots: int, threads: int | None = None):
        heads = int(h5.attrs["heads"])
        grid = tuple(int(g) for g in h5.attrs["grid"])
        self.num_images, self.written = num_images, 0
        self.image_ids = h5.create_dataset("image_id", (num_images,), dtype=h5py.string_dtype())
        self.labels = h5.create_dataset("label", (num_images,), dtype="int64")
        self.predictions = h5.create_dataset("prediction", (num_images,), dtype="int64")
        self.classes = h5.create_dataset("classes", (num_images, num_slots), dtype="int64")
        self.scores = h5.create_dataset("scores", (num_images, num_slots), dtype="float32")
        self.attention = h5.create_dataset(
            "attention", (num_images, num_slots, heads, *grid), dtype="float16",
            chunks=(1, num_slots, heads, *grid), compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True,
        )
        self._threads = threads or min(8, os.cpu_count() or 1)
        self._compress = ThreadPoolExecutor(self._threads, thread_name_prefix="deflate")
        self._store = ThreadPoolExecutor(1, thread_name_prefix="attention-writer")
        self._pending: deque[Future] = deque()

    def write(self, image_ids, labels: np.ndarray, predictions: np.ndarray, scores: np.ndarray, classes: np.ndarray,
              attention: np.ndarray) -> None:
        """The next len(image_ids) rows: labels, predictions [B], scores and classes [B, K] and their maps
        attention [B, K, heads, h, w] (stored as float16)."""
        start, stop = self.written, self.written + len(image_ids)
        if stop > self.num_images:
            raise ValueError(f"expected {self.num_images} images, got more")
        attention = np.asarray(attention, dtype=np.float16)
        if attention.shape != (len(image_ids), *self.attention.chunks[1:]):  # chunks are written as they are given
            raise ValueError(f"attention maps of shape {attention.shape}, expected "
                             f"{(len(image_ids), *self.attention.chunks[1:])}")
        groups = np.array_split(np.arange(len(attention)), min(self._threads, len(attention)) or 1)
        chunks = [self._compress.submit(lambda rows: [shuffled_deflate(attention[r]) for r in rows], rows)
                  for rows in groups]
        rows = (list(image_ids), labels, predictions, scores, classes)
        self._pending.append(self._store.submit(self._store_rows, start, stop, rows, chunks))
        self.written = stop
        while len(self._pending) > PENDING_BATCHES:
            self._pending.popleft().result()

    def _store_rows(self, start: int, stop: int, rows: tuple, chunks: list[Future]) -> None:
        image_ids, labels, predictions, scores, classes = rows
        self.image_ids[start:stop] = image_ids
        self.labels[start:stop] = labels
        self.predictions[start:stop] = predictions
        self.scores[start:stop] = scores
        self.classes[start:stop] = classes
        compressed = [chunk for group in chunks for chunk in group.result()]
        for row, chunk in zip(range(start, stop), compressed):
            self.attention.id.write_direct_chunk((row, 0, 0, 0, 0), chunk)

    def finish(self) -> None:
        """Wait until every batch is on disk (raising the writer's error, if any) and stop the threads."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._store.shutdown(cancel_futures=True)
            self._compress.shutdown(cancel_futures=True)


@contextmanager
def write_attention(path: str | os.PathLike, num_images: int, num_slots: int, attrs: dict,
                    threads: int | None = None) -> Iterator[AttentionWriter]:
    """Write attention.h5 at `path` atomically: `attrs` are its attributes and class_names (see the module
    docstring; their heads and grid give the datasets' shapes), the yielded writer fills its `num_images` rows of
    `num_slots` maps, compressing them on `threads` threads (default: the CPUs, at most 8). The file appears only
    when the block succeeds with every row written (ValueError otherwise)."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as h5:
        write_attributes(h5, attrs)
        writer = AttentionWriter(h5, num_images, num_slots, threads)
        try:
            yield writer
        finally:
            writer.finish()
        if writer.written != num_images:
            raise ValueError(f"expected {num_images} images, got {writer.written}")


class AttentionFile:
    """Read access to an attention.h5 (layout in the module docstring); use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.h5 = h5py.File(self.path, "r")
        attrs = read_attributes(self.h5)
        self.rank = str(attrs["rank"])
        self.class_names = attrs["class_names"]
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
