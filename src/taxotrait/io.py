"""Atomic writes of output files and tables: readers and reruns never see a partial file; the columns of a table."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write `path` atomically: yields a temporary name in the same folder; when the block succeeds it is renamed to
    `path` (an atomic replace), when it fails it is removed. Readers and reruns never see a partial file.

    >>> with atomic_write("out/table.parquet") as tmp:
    ...     frame.to_parquet(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(3)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(frame, path: str | os.PathLike) -> None:
    """A pandas DataFrame to a Parquet file, without its index, atomically (`atomic_write`)."""
    with atomic_write(path) as tmp:
        frame.to_parquet(tmp, index=False)


def parquet_columns(path: str | os.PathLike) -> list[str]:
    """The column names of the Parquet file at `path`, from its schema (no data read)."""
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


def empty_table(columns: dict):
    """An empty pandas DataFrame with these {column: dtype}: a table's schema when it has no rows."""
    import pandas as pd

    return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in columns.items()})


@contextmanager
def atomic_outputs(outputs: Mapping) -> Iterator[dict]:
    """`atomic_write` for every named output file of a step: yields {name: temporary path}; all of them are renamed
    to their real names once the block succeeded, none is left when it fails."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(atomic_write(path)) for name, path in outputs.items()}
