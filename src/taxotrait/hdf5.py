"""What the HDF5 stores share: their attributes, with the lists of names as datasets.

An HDF5 attribute lives in its object's header, whose 64 KiB limit holds about 4,000 class names: the stores keep
every list of names (`NAME_LISTS`) as a string dataset instead, and read old files that kept them as attributes.
"""

from __future__ import annotations

from collections.abc import Mapping

import h5py
import numpy as np

NAME_LISTS = ("class_names",)


def write_attributes(h5: h5py.File, attrs: Mapping) -> None:
    """`attrs` on `h5`: the lists of names of `NAME_LISTS` as string datasets, every other value as an attribute."""
    for key, value in attrs.items():
        if key in NAME_LISTS:
            h5.create_dataset(key, data=np.array([str(v) for v in value], dtype=object), dtype=h5py.string_dtype())
        else:
            h5.attrs[key] = value


def read_attributes(h5: h5py.File) -> dict:
    """The attributes of `h5` and its lists of names (`NAME_LISTS`, as lists of str), from a dataset or, in files
    written before they moved there, from an attribute."""
    attrs = dict(h5.attrs)
    for key in NAME_LISTS:
        if key in h5:
            attrs[key] = h5[key].asstr()[:].tolist()
        elif key in attrs:
            attrs[key] = [str(v) for v in attrs[key]]
    return attrs
