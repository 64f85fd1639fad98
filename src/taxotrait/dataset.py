"""Datasets and taxonomies: read an image tree or a CSV manifest, validate against the taxonomy, write tables.

Outputs (see config/README.md): ``manifest.parquet`` (image_id, path, split, one column per rank, extra manifest
columns), ``classes.parquet`` (rank, class_index, taxon, parent, n_train, n_val, n_test) and ``rejects.parquet``
(path, image_id, reason).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import logging
import os
import re
import stat
import unicodedata
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .errors import DatasetError
from .io import ParquetChunks, atomic_outputs, empty_table

log = logging.getLogger("taxotrait.dataset")

SPLITS = ("train", "val", "test")
# Left out of an image tree, as no part of the data: hidden files and folders (".*": macOS "._*" and ".DS_Store",
# ".thumbnails", ...) and what operating systems, archivers and NAS boxes add.
SYSTEM_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information", "@eaDir"}
# Image formats PIL cannot read: in a tree they are rejected (counted, with a hint), not skipped as non-images.
UNREADABLE_IMAGE_SUFFIXES = {".heic", ".heif", ".jxl", ".svg", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2",
                             ".raf"}
SKIPPED = "skipped: "  # reason prefix, in rejects.parquet, of files that are not images (not counted as rejected)
MIN_IMAGE_SIDE = 8  # pixels; smaller images are rejected, larger ones are resized (up or down) by the transform
ALPHA_BACKGROUND = (255, 255, 255)  # transparent images are composited onto white, as an image viewer shows them
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 'I' (32-bit integer) is read as 16-bit too
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
CHECK_CHUNK = 64  # images per task, at most, of the worker processes that check images (`image_checks`)
LINE_END = re.compile(rb"\r\n|\r|\n")
CHUNK_ROWS = 32_768  # rows of the prepare step at a time: CSV rows read, images checked, Parquet row groups


class ImageError(ValueError):
    """An image file cannot be used. `reason` is what rejects.parquet records; the message also names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # raised in a worker process, it reaches the main process as it is
        return type(self), (self.path, self.reason)


def job_cpus(threads: int) -> int:
    """The CPUs a job may use: its `threads` (Snakemake's), at most the CPUs this process may run on (a SLURM job's
    allocation, e.g. its cpus_per_gpu)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(int(threads), available))


class PixelLimit:
    """PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, set from data.max_image_pixels) of this process,
    set again when called in a worker process (a process pool's initializer, a DataLoader's worker_init_fn)."""

    def __init__(self):
        self.limit = Image.MAX_IMAGE_PIXELS

    def __call__(self, *_):
        Image.MAX_IMAGE_PIXELS = self.limit


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode.

    - 16-bit grey ('I;16*', and 'I') is scaled to 8 bits (value / 257, rounded: 65535 -> 255), not clipped;
    - transparency (RGBA, LA, PA, premultiplied modes, palette or grey images with a transparent colour) is
      composited onto white (`ALPHA_BACKGROUND`), so transparent pixels never show their hidden colour;
    - CMYK, palette, grey, 1-bit and YCbCr images use PIL's conversion (CMYK without colour management);
    - floating-point ('F') and other modes without a conversion to RGB raise ValueError.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise ValueError("floating-point images are not supported; save them as 8- or 16-bit")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as upright 8-bit RGB: the one place where a file becomes RGB (`taxotrait.data.load_image`
    and `check_image` both use it).

    The EXIF orientation is applied (`ImageOps.exif_transpose`), then `to_rgb`. Raises ImageError, whose reason is
    one of: file not found, empty file, not an image, too large (more pixels than PIL's decompression-bomb limit
    `Image.MAX_IMAGE_PIXELS`, set by data.max_image_pixels), cannot decode (truncated or corrupt), unsupported image
    mode, too small (shorter side below MIN_IMAGE_SIDE).
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as err:  # a symbolic-link loop, no permission
        raise ImageError(path, f"cannot read: {err.strerror}") from None
    if stat.S_ISDIR(status.st_mode):
        raise ImageError(path, "not an image: a folder")
    if status.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit is a rejection
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)  # decodes the pixels
    except UnidentifiedImageError:
        suffix = Path(path).suffix.lower()
        hint = f" ({suffix} files must be converted, e.g. to JPEG)" if suffix in UNREADABLE_IMAGE_SUFFIXES else ""
        raise ImageError(path, f"not an image: PIL cannot identify its format{hint}") from None
    except PermissionError as err:
        raise ImageError(path, f"cannot read: {err.strerror}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(path, f"too large: {err} (limit: data.max_image_pixels)") from None
    except Exception as err:  # truncated file, corrupt data, broken EXIF
        raise ImageError(path, f"cannot decode (truncated or corrupt): {type(err).__name__}: {err}") from None
    try:
        rgb = to_rgb(image)
    except Exception as err:
        raise ImageError(path, f"unsupported image mode {image.mode}: {err}") from None
    if min(rgb.size) < MIN_IMAGE_SIDE:
        raise ImageError(path, f"too small: {rgb.size[0]}x{rgb.size[1]} pixels (the shorter side must be at least "
                               f"{MIN_IMAGE_SIDE})")
    return rgb


def taxon_name(name: str) -> str:
    """A taxon name as compared and stored: Unicode NFC (macOS writes folder names decomposed, NFD), no outer
    spaces."""
    return unicodedata.normalize("NFC", name).strip()


def _table_encoding(path: Path) -> str:
    """The encoding of a table file, read in blocks of whole lines (memory bounded whatever its size): UTF-8 (with
    or without the byte-order mark Excel writes), UTF-16 with a byte-order mark, else Windows-1252 (what Excel saves
    as "CSV" on Windows; a warning says so). An Excel workbook, or a file that is neither, is a DatasetError."""
    with open(path, "rb") as file:
        head = file.read(4)
        if head.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
            raise DatasetError(f"{path}: an Excel workbook, not a CSV text file: save it from Excel as 'CSV UTF-8'")
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            decoder = codecs.getincrementaldecoder("utf-16")()
            file.seek(0)
            try:
                for block in iter(lambda: file.read(1 << 20), b""):
                    decoder.decode(block)
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as err:  # e.g. cut short
                raise DatasetError(f"{path}: not valid UTF-16 text ({err.reason}): save it as UTF-8 (in Excel: CSV "
                                   "UTF-8)") from None
            return "utf-16"
        file.seek(0)
        lines, first_error = 0, None
        for block in _line_blocks(file):
            if first_error is None:
                try:
                    block.decode("utf-8")
                except UnicodeDecodeError as err:
                    line = _line_ends(block[: err.start])
                    first_error = block[err.start], lines + line + 1, LINE_END.split(block)[line][:200]
            if first_error is not None:
                try:
                    block.decode("cp1252")
                except UnicodeDecodeError:
                    raise DatasetError(f"{path}: not UTF-8 text (byte {first_error[0]:#04x} on line "
                                       f"{first_error[1]}): save it as UTF-8 (in Excel: CSV UTF-8)") from None
            lines += _line_ends(block)
    if not first_error:
        return "utf-8-sig"
    log.warning("%s is not UTF-8: read as Windows-1252 (Excel's CSV on Windows), line %d reads %r; save it as UTF-8 "
                "if that is wrong", path, first_error[1], first_error[2].decode("cp1252"))
    return "cp1252"


def _line_ends(data: bytes) -> int:
    """The line ends in `data`: LF, CR LF or CR (old Mac files)."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _line_blocks(file, size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a binary file in blocks of about `size` bytes that end at a line end, LF (CR LF) or else CR: no
    character and no line end is split."""
    rest = b""
    for block in iter(lambda: file.read(size), b""):
        data = rest + block
        end = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1  # a last CR may start a CR LF
        if end:
            yield data[:end]
        rest = data[end:]
    if rest:
        yield rest


def _csv_error(path: Path, encoding: str, separator: str, error: Exception) -> DatasetError:
    """The error of a CSV table that pandas cannot parse: the first row with more fields than the header (read
    again with `csv`, line by line), else pandas' message."""
    with open(path, encoding=encoding, newline="") as file:
        rows = csv.reader(file, delimiter=separator)
        width = len(next(row for row in rows if row))
        for row in rows:
            if len(row) > width:
                return DatasetError(f"{path}: not a valid CSV table: line {rows.line_num} has more fields than the "
                                    f"header's {width} (a {separator!r} in a value must be quoted)")
    return DatasetError(f"{path}: not a valid CSV table: {error}")


def iter_table(path: str | os.PathLike, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """A CSV table (taxonomy or manifest) as strings, in chunks of at most `chunk_rows` rows (memory bounded by a
    chunk, whatever the file's length; at least one chunk, maybe empty), as spreadsheets save it: UTF-8 or
    Windows-1252 (`_table_encoding`), comma-, semicolon- or tab-separated (the header's most frequent of the three),
    outer spaces of column names, empty rows and empty unnamed columns dropped; each chunk's index counts the file's
    rows. An Excel workbook, an empty or malformed file is a DatasetError naming the file."""
    path = Path(path)
    encoding = _table_encoding(path)
    with open(path, encoding=encoding, newline="") as file:
        header = next((line.strip("\r\n").lstrip() for line in file if line.strip()), None)
    if header is None:
        raise DatasetError(f"{path}: empty file")
    separator = max([",", ";", "\t"], key=header.count)

    def chunks(**columns) -> Iterator[pd.DataFrame]:
        reader = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, index_col=False,
                             encoding=encoding, chunksize=chunk_rows, **columns)
        with reader:
            while True:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", pd.errors.ParserWarning)  # a row longer than the header
                        chunk = next(reader)
                except StopIteration:
                    return
                except (pd.errors.ParserWarning, pd.errors.ParserError) as err:
                    raise _csv_error(path, encoding, separator, err) from None
                yield chunk

    names = [str(c).strip() for c in pd.read_csv(path, sep=separator, dtype=str, index_col=False, encoding=encoding,
                                                 nrows=0).columns]
    unnamed = [i for i, name in enumerate(names) if name.startswith("Unnamed: ")]
    filled = {names[i] for chunk in (chunks(usecols=unnamed) if unnamed else ()) for i, column in
              zip(unnamed, chunk.columns) if (chunk[column] != "").any()}
    for table in chunks():
        table.columns = names
        table = table.drop(columns=[names[i] for i in unnamed if names[i] not in filled])
        yield table[(table != "").any(axis=1)]


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV table (`iter_table`) whole."""
    return pd.concat(list(iter_table(path)))


def read_taxonomy(path: str | os.PathLike, ranks: list[str]) -> pd.DataFrame:
    """Read a taxonomy table (one row per species, one column per rank; `read_table`) and check it is a tree."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"taxonomy table not found: {path}")
    table = read_table(path)
    missing = [rank for rank in ranks if rank not in table.columns]
    if missing:
        raise DatasetError(f"{path}: rank column(s) {missing} missing; columns are {list(table.columns)}")
    table = table[ranks].apply(lambda column: column.map(taxon_name))
    for rank in ranks:
        empty = table.index[table[rank] == ""]
        if len(empty):
            raise DatasetError(f"{path}: empty {rank} in row(s) {[int(i) + 2 for i in empty[:5]]} (line numbers)")
    table = table.drop_duplicates().reset_index(drop=True)
    conflicting = table[table[ranks[-1]].duplicated(keep=False)]
    if len(conflicting):
        raise DatasetError(f"{path}: {ranks[-1]} {conflicting[ranks[-1]].iloc[0]!r} has rows with different ranks")
    check_tree(table, ranks, str(path))
    return table


def check_tree(table: pd.DataFrame, ranks: list[str], source: str) -> None:
    """Every taxon must have exactly one parent, and no name may be used at two ranks."""
    for parent_rank, rank in zip(ranks, ranks[1:]):
        parents = table.groupby(rank)[parent_rank].unique()
        several = parents[parents.map(len) > 1]
        if len(several):
            taxon = several.index[0]
            raise DatasetError(f"{source}: {rank} {taxon!r} has several parents at rank {parent_rank}: "
                               f"{sorted(several.iloc[0])}")
    seen: dict[str, str] = {}
    for rank in ranks:
        for taxon in table[rank].unique():
            if taxon in seen and seen[taxon] != rank:
                raise DatasetError(f"{source}: name {taxon!r} is used at ranks {seen[taxon]} and {rank}")
            seen[taxon] = rank


def image_suffixes() -> set[str]:
    """File name suffixes of the image formats PIL opens (.jpg, .png, .gif, .webp, .tif, .bmp, .jp2, ...), stub
    formats (scientific data such as .h5) excepted."""
    Image.init()
    stubs = {fmt for fmt, (factory, _) in Image.OPEN.items()
             if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)}
    return {suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in stubs}


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of a folder sorted by name, hidden and system ones (SYSTEM_NAMES) left out."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not e.name.startswith(".") and e.name not in SYSTEM_NAMES),
                          key=lambda e: e.name)
    except OSError as err:
        raise DatasetError(f"{folder}: cannot read the folder: {err.strerror}") from None


def _folder_id(path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a folder or a link to one (read from the listing: no system call but for links); a
    broken or looping link is not."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _files(folder, above: frozenset) -> Iterator[os.DirEntry]:
    """Every file under `folder`, in sub-folders and linked folders too; a symbolic link back to a folder above it
    (a loop) is not followed, with a warning. `above`: the ids of the folders above and including `folder`."""
    for entry in _entries(folder):
        if not _is_folder(entry):  # a file, or a broken or looping link: read_image says which
            yield entry
        elif (folder_id := _folder_id(entry.path)) in above:
            log.warning("%s: a symbolic link to a folder above it (a loop): not followed", entry.path)
        else:
            yield from _files(entry.path, above | {folder_id})


def _species_files(root: Path, folder: Path) -> list[os.DirEntry]:
    """The files of a species folder (`_files`; the root, split and species folders are above)."""
    return list(_files(folder, frozenset(map(_folder_id, (root, folder.parent, folder)))))


def _tree_folders(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(split, species folder name, path) of an image tree; a file outside the species folders gives ('', '',
    path) or (split, '', path). Folders under the root must be split names."""
    for top in _entries(root):
        top_path = Path(top.path)
        if not _is_folder(top):
            yield "", "", top_path
            continue
        if top.name not in SPLITS:
            raise DatasetError(f"{top_path}: split folders must be named {SPLITS}")
        for entry in _entries(top_path):
            yield top.name, (entry.name if _is_folder(entry) else ""), Path(entry.path)


def iter_image_tree(root: str | os.PathLike, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Images laid out as ``<root>/<split>/<species>/<image>``, in sub-folders of a species folder too
    (``<species>/2024/<image>``), in tables of whole species folders and at least `chunk_rows` rows (the last may be
    smaller; memory bounded by a chunk and the largest folder): columns path, split, species (`taxon_name` of the
    folder name), image_id (the path under the root, without suffix) and skip_reason: '' for an image (a file of a
    format PIL opens, or one of UNREADABLE_IMAGE_SUFFIXES, which read_image rejects), else why the file is not taken:
    not an image file, outside a species folder, an empty species folder. Hidden and system files (SYSTEM_NAMES) are
    left out. The index counts the files across tables."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    suffixes = image_suffixes() | UNREADABLE_IMAGE_SUFFIXES
    rows, listed, found, other = [], 0, False, None

    def table() -> pd.DataFrame:
        frame = pd.DataFrame(rows, columns=["path", "split", "species", "relative", "skip_reason"],
                             index=pd.RangeIndex(listed, listed + len(rows)))
        relative = frame.pop("relative")
        frame.insert(3, "image_id", [str(Path(r).with_suffix("")) for r in relative])
        same = frame["image_id"].duplicated(keep=False)  # a.jpg and a.png: their ids keep the suffix
        frame.loc[same, "image_id"] = relative[same]
        return frame

    for split, species, path in _tree_folders(root):
        if species:
            files = [Path(entry.path) for entry in _species_files(root, path)]
            reasons = ["" if file.suffix.lower() in suffixes else
                       f"{SKIPPED}not an image file ({file.suffix.lower() or 'no suffix'})" for file in files]
            files, reasons = (files, reasons) if files else ([path], [f"{SKIPPED}empty folder"])
        else:
            where = "a species folder (<split>/<species>/<image>)" if split else "the split folders"
            files, reasons = [path], [f"{SKIPPED}outside {where}"]
        name = taxon_name(species)
        rows += [(str(file), split, name, unicodedata.normalize("NFC", file.relative_to(root).as_posix()), reason)
                 for file, reason in zip(files, reasons)]
        found = found or "" in reasons
        other = other or next(((file, r) for file, r in zip(files, reasons) if r), None)
        if species and len(rows) >= chunk_rows:  # chunks end after a species folder: its files' ids stay together
            yield table()
            listed, rows = listed + len(rows), []
    if not found:
        raise DatasetError(f"{root}: no images found under <split>/<species>/"
                           + (f" ({listed + len(rows)} other files, e.g. {other[0]}: {other[1]})" if other else ""))
    if rows:
        yield table()


def scan_image_tree(root: str | os.PathLike) -> pd.DataFrame:
    """`iter_image_tree` as one table."""
    return pd.concat(list(iter_image_tree(root)))


def image_tree_fingerprint(root: str | os.PathLike) -> str:
    """A digest of an image tree's content as `scan_image_tree` sees it (`listing_digest` of its files and empty
    species folders), so that adding, removing or replacing an image changes it."""
    root = Path(root)
    return listing_digest(file for _, species, path in _tree_folders(root)
                          for file in (_species_files(root, path) if species else []) or [path])


def listing_digest(paths) -> str:
    """SHA-256 of every path (a path, or a folder listing's entry: one system call fewer) with its size and
    modification time (no file is read; a missing one counts too)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            status = path.stat() if isinstance(path, os.DirEntry) else os.stat(path)
            entry = f"{os.fspath(path)}\0{status.st_size}\0{status.st_mtime_ns}\n"
        except OSError as err:
            entry = f"{os.fspath(path)}\0{err.errno}\n"
        digest.update(entry.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def species_folders(root: str | os.PathLike) -> set[str]:
    """The species (`taxon_name` of the folder names) of an image tree, from its folders alone."""
    return {taxon_name(species) for _, species, _ in _tree_folders(Path(root)) if species}


def iter_manifest(path: str | os.PathLike, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """A CSV manifest (`iter_table`, in chunks of `chunk_rows` rows) with columns path, split and species (or the
    rank columns); relative paths (in `path` and any `*_path` column) are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    for table in iter_table(path, chunk_rows):
        for column in ("path", "split"):
            if column not in table.columns:
                raise DatasetError(f"{path}: required column {column!r} missing; columns are {list(table.columns)}")
        bad_split = table.index[~table["split"].isin(SPLITS)]
        if len(bad_split):
            row = bad_split[0]
            raise DatasetError(f"{path}: row {row + 2} has split {table.loc[row, 'split']!r}; allowed: {SPLITS}")
        for column in [c for c in table.columns if c == "path" or c.endswith("_path")]:
            for row, value in table[column].items():
                if value and not os.path.isabs(value) and os.path.normpath(value).split(os.sep)[0] == os.pardir:
                    raise DatasetError(f"{path}: row {row + 2} {column} {value!r} leaves the manifest's folder "
                                       f"{path.parent}; relative paths must stay inside it (use an absolute path)")
            table[column] = [p if not p or os.path.isabs(p) else str(path.parent / p) for p in table[column]]
        yield table


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """`iter_manifest` as one table."""
    return pd.concat(list(iter_manifest(path)))


def check_image(path: str) -> str | None:
    """Why the image at `path` cannot be used (the reason recorded in rejects.parquet), or None: `read_image`
    decides."""
    try:
        read_image(path)
    except ImageError as err:
        return err.reason
    return None


@contextmanager
def image_checks(workers: int = 1, total: int | None = None, progress: bool = True) -> Iterator:
    """A function of a Series of paths -> the Series of their `check_image` reasons (None: usable), decoding in
    `workers` processes (in tasks of CHECK_CHUNK images at most; the decompression-bomb limit goes with them,
    `PixelLimit`), with one progress bar of `total` images over every call."""
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, desc="checking images", unit=" images", disable=not progress))
        pool = stack.enter_context(ProcessPoolExecutor(workers, initializer=PixelLimit())) if workers > 1 else None

        def check(paths: pd.Series) -> pd.Series:
            chunk = max(1, min(CHECK_CHUNK, len(paths) // (4 * workers)))
            reasons = []
            for reason in pool.map(check_image, paths, chunksize=chunk) if pool else map(check_image, paths):
                reasons.append(reason)
                bar.update()
            return pd.Series(reasons, index=paths.index, dtype=object)

        yield check


REJECT_COLUMNS = {"path": "str", "image_id": "str", "reason": "str"}  # rejects.parquet
LISTING_ROW = "__taxotrait_listing_row__"  # the prepare step's own column: an image's row in the listing


class Tally:
    """What became of each species' files in the prepare step: images taken per split, rejected and skipped files,
    and the training files lost (rejected or skipped) with the first of them."""

    def __init__(self, species: str):
        self.species, self.counts, self.files = species, Counter(), Counter()
        self.first_lost = {"rejected": {}, "skipped": {}}

    def add(self, rows: pd.DataFrame, outcome: str) -> None:
        """Count `rows` (columns species, split, and path and reason unless taken) as 'taken', 'rejected' or
        'skipped' (`files` counts them all; per species, skipped files outside a species folder are not counted)."""
        self.files[outcome] += len(rows)
        rows = rows[rows[self.species] != ""]
        keys = rows["split"] if outcome == "taken" else pd.Series(outcome, index=rows.index)
        self.counts.update(rows.groupby([rows[self.species], keys]).size().to_dict())
        if outcome != "taken":
            lost = rows[rows["split"] == "train"]
            self.counts.update({(name, "lost"): n for name, n in lost[self.species].value_counts().items()})
            for name, path, reason in lost.drop_duplicates(self.species)[[self.species, "path", "reason"]].values:
                self.first_lost[outcome].setdefault(name, f"{path}: {reason}")

    def table(self) -> pd.DataFrame:
        """Species x (train, val, test, rejected, skipped, lost) counts, sorted by species."""
        columns = [*SPLITS, "rejected", "skipped", "lost"]
        counts = pd.Series(self.counts, dtype="int64")
        if counts.empty:
            return pd.DataFrame(columns=columns, dtype="int64")
        return counts.unstack(fill_value=0).reindex(columns=columns, fill_value=0).sort_index()

    def log(self) -> None:
        """One log line per species: images taken per split, rejected and skipped (the reasons are in rejects)."""
        for name, row in self.table().iterrows():
            log.info("%s: %d images taken (%s), %d rejected, %d skipped", name, row[list(SPLITS)].sum(),
                     ", ".join(f"{split} {row[split]}" for split in SPLITS), row["rejected"], row["skipped"])

    def check_training_images(self, source: str) -> None:
        """Every species of the dataset (its images, rejected and skipped files included) needs a usable training
        image, and there must be two species at least; a DatasetError names the species and what became of its
        files."""
        table = self.table()
        untrained = table.index[table["train"] == 0]
        if len(untrained):
            name, row = untrained[0], table.loc[untrained[0]]
            kept = {split: int(row[split]) for split in SPLITS if row[split]}
            example = self.first_lost["rejected"].get(name) or self.first_lost["skipped"].get(name)
            because = f"; its {row['lost']} training files: e.g. {example}" if row["lost"] else ""
            also = f" ({len(untrained) - 1} more: {list(untrained[1:4])})" if len(untrained) > 1 else ""
            raise DatasetError(f"{source}: {self.species} {name!r} has no training images (usable: "
                               f"{kept or 'none'}{because}){also}")
        if len(table) < 2:
            raise DatasetError(f"{source}: a single {self.species} ({table.index[0]!r}): nothing to tell apart; "
                               f"taxotrait needs two {self.species} at least")


def _duplicates(spool: Path, hashes: list[np.ndarray], column: str, key=None) -> pd.DataFrame:
    """The spooled rows of the first value of `column` (compared after `key`) listed more than once, in listing
    order; none when every value is listed once. `hashes`: 64-bit hashes of the compared values, in listing order
    (only rows whose hash repeats are read back and compared)."""
    hashes = np.concatenate(hashes)
    order = np.argsort(hashes, kind="stable")
    repeated = hashes[order][1:] == hashes[order][:-1]
    candidate = np.zeros(len(hashes), bool)
    candidate[order[1:][repeated]] = candidate[order[:-1][repeated]] = True
    rows, start = [], 0
    for chunk in ParquetChunks.chunks(spool, CHUNK_ROWS) if repeated.any() else ():
        rows.append(chunk[candidate[start: start + len(chunk)]])
        start += len(chunk)
    if not rows:
        return pd.DataFrame()
    rows = pd.concat(rows, ignore_index=True)
    values = rows[column].map(key) if key else rows[column]
    same = values.duplicated(keep=False)
    return rows[values == values[same].iloc[0]] if same.any() else pd.DataFrame()


def _hash(values: pd.Series) -> np.ndarray:
    return pd.util.hash_array(values.to_numpy(dtype=object))


def _list_images(chunks: Iterable[pd.DataFrame], taxonomy: pd.DataFrame | None, ranks: list[str], source: str,
                 spool: Path, skipped_files: ParquetChunks, tally: Tally, progress: bool,
                 leaves_of: str | None) -> tuple[pd.DataFrame, int]:
    """The prepare step's first pass: every listed image checked against the taxonomy (derived from the rank columns
    when None) and for duplicate paths and ids, its row (with LISTING_ROW, its row in the listing) written to `spool`;
    skipped files go to `skipped_files`. Returns the taxonomy and the number of images."""
    species = ranks[-1]
    listing, path_hashes, id_hashes = ParquetChunks(spool, CHUNK_ROWS), [], []
    rank_rows, present, unknown = set(), set(), set()  # taxa as listed, species with images, species not in taxonomy
    derived, bar = True, tqdm(desc="listing images", unit=" files", disable=not progress)
    for chunk in chunks:
        bar.update(len(chunk))
        if species not in chunk.columns:
            raise DatasetError(f"{source}: no {species!r} column")
        if taxonomy is None and (missing := [rank for rank in ranks if rank not in chunk.columns]):
            raise DatasetError(f"{source}: no taxonomy table given and rank column(s) {missing} missing")
        if LISTING_ROW in chunk.columns:
            raise DatasetError(f"{source}: the column name {LISTING_ROW!r} is taxotrait's own: rename that column")
        reasons = chunk["skip_reason"].fillna("") if "skip_reason" in chunk else pd.Series("", index=chunk.index)
        skipped = chunk[reasons != ""].assign(reason=reasons[reasons != ""])
        if len(skipped):
            skipped_files.append(skipped[list(REJECT_COLUMNS)])
            tally.add(skipped, "skipped")
        images = chunk[reasons == ""].drop(columns="skip_reason", errors="ignore")
        if images.empty:
            continue
        images = images.assign(**{rank: images[rank].map(taxon_name) for rank in ranks if rank in images.columns},
                               **{LISTING_ROW: images.index})
        for rank in [species] if taxonomy is not None else [r for r in ranks if r in images.columns]:
            if (empty := images.index[images[rank] == ""]).size:
                raise DatasetError(f"{source}: empty {rank} in row(s) {[int(i) + 2 for i in empty[:5]]} (line "
                                   "numbers of a manifest)")
        present.update(images[species])
        if taxonomy is None:
            rank_rows.update(images[ranks].itertuples(index=False, name=None))
        else:
            given = [rank for rank in ranks[:-1] if rank in images.columns]
            images = images.drop(columns=given).merge(taxonomy, on=species, how="left", validate="many_to_one")
            unknown.update(images.loc[images[ranks[0]].isna(), species])
        derived = "image_id" not in images.columns
        if derived:
            images["image_id"] = [image_id_from_path(p) for p in images["path"]]
        path_hashes.append(_hash(images["path"].map(os.path.normpath)))
        id_hashes.append(_hash(images["image_id"]))
        listing.append(images)
    bar.close()
    if taxonomy is None and rank_rows:
        taxonomy = pd.DataFrame(sorted(rank_rows), columns=ranks)
        check_tree(taxonomy, ranks, source)
    if leaves_of:
        from .taxonomy import check_leaves

        check_leaves(taxonomy, pd.Series(sorted(present), dtype=str), leaves_of)
    if unknown:
        known = taxonomy[species].tolist()
        examples = [repr(name) + "".join(f" (the taxonomy has {close!r})" for close in
                                         difflib.get_close_matches(name, known, n=1, cutoff=0.8))
                    for name in sorted(unknown)[:5]]
        raise DatasetError(f"{source}: {len(unknown)} {species} without a taxonomy row, e.g. {', '.join(examples)}")
    if taxonomy is not None and (unused := sorted(set(taxonomy[species]) - present)):
        log.info("the taxonomy lists %d %s without images (not used), e.g. %s", len(unused), species, unused[:3])
    if not path_hashes:
        raise DatasetError(f"{source}: no images listed")
    listing.close(pd.DataFrame())
    same = _duplicates(spool, path_hashes, "path", os.path.normpath)
    if len(same):
        raise DatasetError(f"{source}: image {os.path.normpath(same['path'].iloc[0])!r} is listed more than once "
                           f"(rows {[int(i) + 2 for i in same[LISTING_ROW]]}, line numbers of a manifest)")
    same = _duplicates(spool, id_hashes, "image_id")
    if len(same):
        hint = " (ids are made from split/species/name of the path: add an image_id column)" if derived else ""
        raise DatasetError(f"{source}: duplicate image_id {same['image_id'].iloc[0]!r} ({list(same['path'].iloc[:2])})"
                           f"{hint}")
    return taxonomy, sum(map(len, path_hashes))


def prepare_tables(
    chunks: Iterable[pd.DataFrame],
    taxonomy: pd.DataFrame | None,
    ranks: list[str],
    source: str,
    outputs: Mapping,
    max_reject_fraction: float = 0.01,
    progress: bool = True,
    workers: int = 1,
    leaves_of: str | None = None,
) -> Tally:
    """Validate images against the taxonomy and write outputs['manifest'], ['classes'] and ['rejects'] (Parquet, all
    or none). Returns the Tally of what became of each species' files.

    `chunks`: the listing, in tables with path and split plus either the species column or every rank column (other
    columns are kept; `iter_image_tree`, `iter_manifest`). Rows with a `skip_reason` go to the rejects table as they
    are, not counted as rejected images. Taxon names are compared after `taxon_name`; `leaves_of`: the tree file the
    taxonomy came from, each of whose leaves must have images. Two passes, memory bounded by CHUNK_ROWS rows whatever
    the number of images (plus 16 bytes per image for the duplicate checks): the listing is checked and spooled to a
    temporary file beside the manifest, then its images are decoded in `workers` processes (`image_checks`). Logs,
    per species, how many images were taken, rejected and skipped; more rejects than `max_reject_fraction`, a species
    without usable training images or a dataset of one species is a DatasetError.
    """
    tally = Tally(ranks[-1])
    folder = Path(outputs["manifest"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".prepare-") as tmp, atomic_outputs(outputs) as files:
        spool, skipped = Path(tmp) / "listing.parquet", ParquetChunks(Path(tmp) / "skipped.parquet", CHUNK_ROWS)
        taxonomy, n_images = _list_images(chunks, taxonomy, ranks, source, spool, skipped, tally, progress, leaves_of)
        rejects = ParquetChunks(files["rejects"], CHUNK_ROWS)
        manifest, n_bad, examples = ParquetChunks(files["manifest"], CHUNK_ROWS), 0, []
        with image_checks(workers, n_images, progress) as check:
            for chunk in ParquetChunks.chunks(spool, CHUNK_ROWS):
                reasons = check(chunk["path"])
                bad = reasons.notna()
                rejected = chunk[bad].assign(reason=reasons[bad].astype("str"))
                rejects.append(rejected[list(REJECT_COLUMNS)])
                tally.add(rejected, "rejected")
                tally.add(chunk[~bad], "taken")
                extra = [c for c in chunk.columns if c not in ("image_id", "path", "split", LISTING_ROW, *ranks)]
                manifest.append(chunk.loc[~bad, ["image_id", "path", "split", *ranks, *extra]])
                n_bad += int(bad.sum())
                examples += [f"{p}: {r}" for p, r in zip(rejected["path"], rejected["reason"])][: 3 - len(examples)]
        tally.log()
        if n_bad / n_images > max_reject_fraction:
            raise DatasetError(f"{source}: {n_bad} of {n_images} images rejected, more than the allowed "
                               f"{max_reject_fraction:.1%} (data.max_reject_fraction), e.g. {'; '.join(examples)}")
        if n_bad == n_images:
            raise DatasetError(f"{source}: none of the {n_images} images can be used, e.g. {examples[0]}")
        tally.check_training_images(source)
        manifest.close(pd.DataFrame())
        skipped.close(empty_table(REJECT_COLUMNS))
        for chunk in ParquetChunks.chunks(skipped.path, CHUNK_ROWS):  # after the rejected images
            rejects.append(chunk)
        rejects.close(empty_table(REJECT_COLUMNS))
        class_table(tally.table()[list(SPLITS)], taxonomy, ranks, source).to_parquet(files["classes"], index=False)
    return tally


def prepare_dataset(
    images: pd.DataFrame,
    taxonomy: pd.DataFrame | None,
    ranks: list[str],
    source: str,
    max_reject_fraction: float = 0.01,
    progress: bool = True,
    workers: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """`prepare_tables` of one table of images (e.g. `scan_image_tree`, `read_manifest`): the (manifest, classes,
    rejects) tables."""
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {name: Path(tmp) / f"{name}.parquet" for name in ("manifest", "classes", "rejects")}
        prepare_tables([images], taxonomy, ranks, source, outputs, max_reject_fraction, progress, workers)
        return tuple(pd.read_parquet(path) for path in outputs.values())


def image_id_from_path(path: str) -> str:
    """A readable id: the image's split/species/name without extension."""
    parts = Path(path).with_suffix("").parts
    return "/".join(parts[-3:])


def class_table(counts: pd.DataFrame, taxonomy: pd.DataFrame, ranks: list[str], source: str) -> pd.DataFrame:
    """One row per (rank, taxon) of the species with images (`counts`: species x split images taken): class_index
    (sorted names), parent and image counts per split; a warning names a rank with a single taxon."""
    counts = counts[counts.sum(axis=1) > 0]
    taxa = taxonomy.set_index(ranks[-1])[ranks[:-1]].reindex(counts.index).join(counts).reset_index(names=ranks[-1])
    tables = []
    for depth, rank in enumerate(ranks):
        groups = taxa.groupby(rank)
        totals = groups[list(SPLITS)].sum()
        if len(totals) == 1 and rank != ranks[-1]:
            log.warning("%s: %s has a single taxon (%r): nothing to contrast at this rank", source, rank,
                        totals.index[0])
        tables.append(pd.DataFrame({
            "rank": rank,
            "class_index": np.arange(len(totals), dtype="int64"),
            "taxon": totals.index.astype(str),
            "parent": groups[ranks[depth - 1]].first().values if depth else "",
            **{f"n_{split}": totals[split].values.astype("int64") for split in SPLITS},
        }))
    return pd.concat(tables, ignore_index=True)


def class_names(classes: pd.DataFrame, rank: str) -> list[str]:
    """Class names of `rank` in class-index order."""
    return classes[classes["rank"] == rank].sort_values("class_index")["taxon"].tolist()


def class_parents(classes: pd.DataFrame, rank: str) -> list[str]:
    """Parent taxon of each class of `rank` in class-index order ('' at the top rank: one group of siblings)."""
    return classes[classes["rank"] == rank].sort_values("class_index")["parent"].fillna("").astype(str).tolist()


def labels(manifest: pd.DataFrame, classes: pd.DataFrame, rank: str) -> pd.Series:
    """Class index of every manifest row at `rank`."""
    index = {taxon: i for i, taxon in enumerate(class_names(classes, rank))}
    return manifest[rank].map(index).astype("int64")


def read_manifest_table(path: str | os.PathLike, columns: list[str] | None = None,
                        splits: list[str] | tuple[str, ...] | None = None) -> pd.DataFrame:
    """The manifest.parquet at `path`, only its `columns` (all when None) and the rows of `splits` (split names; all
    rows when None), in the file's order, indexed 0..n-1. Read batch by batch, each batch filtered as it comes: the
    rows left out are never held all at once (half the peak of `pd.read_parquet`'s filters). A requested column the
    file lacks (e.g. a manifest written by an older version) is a DatasetError."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        schema = file.schema_arrow
        kept = schema.names if columns is None else list(columns)
        read = list(dict.fromkeys([*kept, *(["split"] if splits is not None else [])]))
        missing = [c for c in read if c not in schema.names]
        if missing:
            raise DatasetError(f"{path}: no column {', '.join(map(repr, missing))} (a manifest written by an older "
                               "version? run the prepare rule again)")
        batches = file.iter_batches(columns=read)
        if splits is not None:
            chosen = pa.array(list(splits), pa.string())
            batches = (batch.filter(pc.is_in(batch["split"], value_set=chosen)) for batch in batches)
        table = pa.Table.from_batches((batch.select(kept) for batch in batches),
                                      pa.schema([schema.field(c) for c in kept], metadata=schema.metadata))
    return table.to_pandas().reset_index(drop=True)


def prepare_files(inputs: dict, outputs: dict, data: dict, ranks: list[str], workers: int = 1) -> None:
    """Image tree or manifest + taxonomy (`data`: the config's data section) -> manifest, classes and rejects tables
    of `ranks` (`prepare_tables`: memory bounded whatever the number of images), the images decoded in `workers`
    processes."""
    if data.get("images"):
        chunks = (table.rename(columns={"species": ranks[-1]}) for table in iter_image_tree(data["images"]))
        source = data["images"]
    else:
        chunks, source = iter_manifest(inputs["manifest"]), inputs["manifest"]
    taxonomy = read_taxonomy(inputs["taxonomy"], ranks) if inputs.get("taxonomy") else None
    if inputs.get("tree"):
        from .taxonomy import tree_taxonomy

        taxonomy = tree_taxonomy(inputs["tree"], ranks)
    tally = prepare_tables(chunks, taxonomy, ranks, source, outputs, data["max_reject_fraction"], workers=workers,
                           leaves_of=str(inputs["tree"]) if inputs.get("tree") else None)
    classes = pd.read_parquet(outputs["classes"], columns=["rank"])
    log.info("%d images, %d rejected, %d other files skipped; classes per rank: %s", tally.files["taken"],
             tally.files["rejected"], tally.files["skipped"], classes.groupby("rank", sort=False).size().to_dict())


def taxa_per_rank(data: dict, ranks: list[str]) -> dict[str, int]:
    """How many taxa each rank has in a user's dataset (`data.images` or `data.manifest`, with `data.taxonomy` or
    `data.tree`), read from its tables and the image tree's folder names alone (no image is opened), before any job
    runs."""
    species = ranks[-1]
    if data.get("images"):
        table, present = None, species_folders(data["images"])
    else:
        columns = [species] if data.get("taxonomy") or data.get("tree") else ranks
        table = pd.concat([chunk[[c for c in columns if c in chunk]].drop_duplicates()
                           for chunk in iter_manifest(data["manifest"])]).drop_duplicates()
        present = set(table[species].map(taxon_name)) if species in table else set()
    if data.get("taxonomy"):
        table = read_taxonomy(data["taxonomy"], ranks)
        table = table[table[species].isin(present)]
    elif data.get("tree"):  # every leaf must have images (taxonomy.check_leaves): the whole tree counts
        from .taxonomy import tree_taxonomy

        table = tree_taxonomy(data["tree"], ranks)
    return {rank: table[rank].map(taxon_name).nunique() for rank in ranks if rank in table}


def dataset_fingerprint(data: dict) -> str:
    """A digest of the user's images as listed (`image_tree_fingerprint`, or the size and modification time of every
    file a manifest names, read in chunks): a params value of the prepare rule, so that new, removed or replaced
    images re-run it. Empty for the synthetic demo, whose images the workflow makes."""
    if data.get("images"):
        return image_tree_fingerprint(data["images"])
    if not data.get("manifest"):
        return ""
    return listing_digest(path for chunk in iter_manifest(data["manifest"]) for path in chunk["path"])
