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


class ParquetChunks:
    """A Parquet table written chunk by chunk: `append` DataFrames with the same columns, `close` when done. Chunks
    are gathered into row groups of `rows` rows, so memory stays bounded by a row group whatever the table's length;
    `chunks` reads a finished file back one row group at a time. Write to a temporary name (`atomic_write`) when
    readers must never see a partial table."""

    def __init__(self, path: str | os.PathLike, rows: int):
        self.path, self.rows = Path(path), rows
        self.buffer, self.buffered, self.writer = [], 0, None

    def append(self, frame) -> None:
        """Add the rows of `frame` (none: nothing happens)."""
        if len(frame):
            self.buffer.append(frame)
            self.buffered += len(frame)
            if self.buffered >= self.rows:
                self._flush()

    def _flush(self) -> None:
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self.writer.schema if self.writer else None
        table = pa.Table.from_pandas(pd.concat(self.buffer, ignore_index=True), schema=schema, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table, row_group_size=self.rows)
        self.buffer, self.buffered = [], 0

    def close(self, empty) -> None:
        """Write what is buffered and finish the file; a table without rows is written as `empty` (a DataFrame with
        the columns and dtypes, `empty_table`)."""
        if self.buffer:
            self._flush()
        if self.writer is None:
            empty.to_parquet(self.path, index=False)
        else:
            self.writer.close()

    @staticmethod
    def chunks(path: str | os.PathLike, rows: int) -> Iterator:
        """The table at `path` as DataFrames of at most `rows` rows, in order."""
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield batch.to_pandas()
