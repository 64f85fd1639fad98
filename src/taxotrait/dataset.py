"""Datasets and taxonomies: read an image tree or a CSV manifest, validate against the taxonomy, write tables.

Outputs (see config/README.md): ``manifest.parquet`` (image_id, path, split, one column per rank, extra manifest
columns), ``classes.parquet`` (rank, class_index, taxon, parent, n_train, n_val, n_test) and ``rejects.parquet``
(path, image_id, reason).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import logging
import os
import stat
import unicodedata
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .errors import DatasetError
from .io import write_parquet

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
CHECK_CHUNK = 64  # images per task, at most, of the worker processes that check images (`check_images`)


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


def _decode(data: bytes, path: Path) -> str:
    """The text of a table file: UTF-8 (with or without the byte-order mark Excel writes), UTF-16 with a byte-order
    mark, else Windows-1252 (what Excel saves as "CSV" on Windows; a warning says so)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: not UTF-8 text (byte {data[err.start]:#04x} on line {line}): save it as "
                               "UTF-8 (in Excel: CSV UTF-8)") from None
    log.warning("%s is not UTF-8: read as Windows-1252 (Excel's CSV on Windows), line %d reads %r; save it as UTF-8 "
                "if that is wrong", path, line, text.splitlines()[line - 1])
    return text


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV table (taxonomy or manifest) as strings, as spreadsheets save it: UTF-8 or Windows-1252 (`_decode`),
    comma-, semicolon- or tab-separated (the header's most frequent of the three), outer spaces of column names,
    empty rows and empty unnamed columns dropped. An Excel workbook, an empty or malformed file is a DatasetError
    naming the file."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise DatasetError(f"{path}: an Excel workbook, not a CSV text file: save it from Excel as 'CSV UTF-8'")
    text = _decode(data, path)
    if not text.strip():
        raise DatasetError(f"{path}: empty file")
    header = text.lstrip().splitlines()[0]
    separator = max([",", ";", "\t"], key=header.count)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # a row longer than the header: data lost
            table = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserWarning:
        width = len(next(csv.reader([header], delimiter=separator)))
        rows = csv.reader(io.StringIO(text), delimiter=separator)
        line = next(n for n, row in enumerate(rows, 1) if len(row) > width)
        raise DatasetError(f"{path}: not a valid CSV table: line {line} has more fields than the header's "
                           f"{width} (a {separator!r} in a value must be quoted)") from None
    except pd.errors.ParserError as err:
        raise DatasetError(f"{path}: not a valid CSV table: {err}") from None
    table.columns = [str(c).strip() for c in table.columns]
    unnamed = [c for c in table.columns if c.startswith("Unnamed: ") and (table[c] == "").all()]
    table = table.drop(columns=unnamed)
    return table[(table != "").any(axis=1)]  # the index still counts the file's rows


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


def _files(folder: Path, above: frozenset) -> Iterator[Path]:
    """Every file under `folder`, in sub-folders and linked folders too; a symbolic link back to a folder above it
    (a loop) is not followed, with a warning. `above`: the ids of the folders above and including `folder`."""
    for entry in _entries(folder):
        path = Path(entry.path)
        if not os.path.isdir(path):  # a file, or a broken or looping link: read_image says which
            yield path
        elif (folder_id := _folder_id(path)) in above:
            log.warning("%s: a symbolic link to a folder above it (a loop): not followed", path)
        else:
            yield from _files(path, above | {folder_id})


def _species_files(root: Path, folder: Path) -> list[Path]:
    """The files of a species folder (`_files`; the root, split and species folders are above)."""
    return list(_files(folder, frozenset(map(_folder_id, (root, folder.parent, folder)))))


def _tree_folders(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(split, species folder name, path) of an image tree; a file outside the species folders gives ('', '',
    path) or (split, '', path). Folders under the root must be split names."""
    for top in _entries(root):
        top_path = Path(top.path)
        if not os.path.isdir(top_path):
            yield "", "", top_path
            continue
        if top.name not in SPLITS:
            raise DatasetError(f"{top_path}: split folders must be named {SPLITS}")
        for entry in _entries(top_path):
            yield top.name, (entry.name if os.path.isdir(entry.path) else ""), Path(entry.path)


def scan_image_tree(root: str | os.PathLike) -> pd.DataFrame:
    """Images laid out as ``<root>/<split>/<species>/<image>``, in sub-folders of a species folder too
    (``<species>/2024/<image>``): columns path, split, species (`taxon_name` of the folder name), image_id (the path
    under the root, without suffix) and skip_reason: '' for an image (a file of a format PIL opens, or one of
    UNREADABLE_IMAGE_SUFFIXES, which read_image rejects), else why the file is not taken: not an image file, outside
    a species folder, an empty species folder. Hidden and system files (SYSTEM_NAMES) are left out."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    suffixes = image_suffixes() | UNREADABLE_IMAGE_SUFFIXES
    rows = []
    for split, species, path in _tree_folders(root):
        if not species:
            where = "a species folder (<split>/<species>/<image>)" if split else "the split folders"
            rows.append((path, split, species, f"{SKIPPED}outside {where}"))
            continue
        files = _species_files(root, path)
        rows += [(file, split, species, "" if file.suffix.lower() in suffixes else
                  f"{SKIPPED}not an image file ({file.suffix.lower() or 'no suffix'})") for file in files]
        if not files:
            rows.append((path, split, species, f"{SKIPPED}empty folder"))
    if not any(reason == "" for *_, reason in rows):
        raise DatasetError(f"{root}: no images found under <split>/<species>/"
                           + (f" ({len(rows)} other files, e.g. {rows[0][0]}: {rows[0][3]})" if rows else ""))
    table = pd.DataFrame([(str(path), split, taxon_name(species), reason) for path, split, species, reason in rows],
                         columns=["path", "split", "species", "skip_reason"])
    relative = [unicodedata.normalize("NFC", Path(p).relative_to(root).as_posix()) for p in table["path"]]
    table.insert(3, "image_id", [str(Path(r).with_suffix("")) for r in relative])
    same = table["image_id"].duplicated(keep=False)  # a.jpg and a.png: their ids keep the suffix
    table.loc[same, "image_id"] = [r for r, s in zip(relative, same) if s]
    return table


def image_tree_fingerprint(root: str | os.PathLike) -> str:
    """A digest of an image tree's content as `scan_image_tree` sees it (`listing_digest` of its files and empty
    species folders), so that adding, removing or replacing an image changes it."""
    root = Path(root)
    return listing_digest(file for _, species, path in _tree_folders(root)
                          for file in (_species_files(root, path) if species else []) or [path])


def listing_digest(paths) -> str:
    """SHA-256 of every path with its size and modification time (no file is read; a missing one counts too)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            status = os.stat(path)
            entry = f"{path}\0{status.st_size}\0{status.st_mtime_ns}\n"
        except OSError as err:
            entry = f"{path}\0{err.errno}\n"
        digest.update(entry.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def species_folders(root: str | os.PathLike) -> set[str]:
    """The species (`taxon_name` of the folder names) of an image tree, from its folders alone."""
    return {taxon_name(species) for _, species, _ in _tree_folders(Path(root)) if species}


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV manifest (`read_table`) with columns path, split and species (or the rank columns); relative paths (in
    `path` and any `*_path` column) are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    table = read_table(path)
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
    return table.reset_index(drop=True)


def check_image(path: str) -> str | None:
    """Why the image at `path` cannot be used (the reason recorded in rejects.parquet), or None: `read_image`
    decides."""
    try:
        read_image(path)
    except ImageError as err:
        return err.reason
    return None


def check_images(paths: list[str], workers: int = 1, progress: bool = True) -> list[str | None]:
    """`check_image` of every path, in order; with `workers` > 1 in as many processes, in chunks of CHECK_CHUNK
    images at most (the same reasons: the decompression-bomb limit goes with them, `PixelLimit`)."""
    paths = list(paths)
    bar = {"total": len(paths), "desc": "checking images", "disable": not progress}
    if workers <= 1:
        return [check_image(p) for p in tqdm(paths, **bar)]
    chunk = max(1, min(CHECK_CHUNK, len(paths) // (4 * workers)))
    with ProcessPoolExecutor(workers, initializer=PixelLimit()) as pool:
        return list(tqdm(pool.map(check_image, paths, chunksize=chunk), **bar))


def prepare_dataset(
    images: pd.DataFrame,
    taxonomy: pd.DataFrame | None,
    ranks: list[str],
    source: str,
    max_reject_fraction: float = 0.01,
    progress: bool = True,
    workers: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Validate images against the taxonomy: (manifest, classes, rejects) tables; the images are decoded in `workers`
    processes (`check_images`).

    `images` has path and split plus either the species column or every rank column; other columns are kept. Rows
    with a `skip_reason` (`scan_image_tree`) go to the rejects table as they are, not counted as rejected images.
    Taxon names are compared after `taxon_name`. Logs, per species, how many images were taken, rejected and
    skipped; a species without usable training images or a dataset of one species is a DatasetError.
    """
    species = ranks[-1]
    if species not in images.columns:
        raise DatasetError(f"{source}: no {species!r} column")
    reasons = images.get("skip_reason", pd.Series("", index=images.index)).fillna("")
    skipped = images[reasons != ""].assign(reason=reasons[reasons != ""])
    images = images[reasons == ""].drop(columns="skip_reason", errors="ignore").copy()
    for rank in [r for r in ranks if r in images.columns]:
        images[rank] = images[rank].map(taxon_name)
    if taxonomy is None:
        missing = [rank for rank in ranks if rank not in images.columns]
        if missing:
            raise DatasetError(f"{source}: no taxonomy table given and rank column(s) {missing} missing")
        taxonomy = images[ranks].drop_duplicates().reset_index(drop=True)
        check_tree(taxonomy, ranks, source)
    else:
        given = [rank for rank in ranks[:-1] if rank in images.columns]
        images = images.drop(columns=given).merge(taxonomy, on=species, how="left", validate="many_to_one")
        unknown = sorted(images[images[ranks[0]].isna()][species].unique())
        if unknown:
            known = taxonomy[species].tolist()
            examples = [repr(name) + "".join(f" (the taxonomy has {close!r})" for close in
                                             difflib.get_close_matches(name, known, n=1, cutoff=0.8))
                        for name in unknown[:5]]
            raise DatasetError(f"{source}: {len(unknown)} {species} without a taxonomy row, e.g. {', '.join(examples)}")
        unused = sorted(set(taxonomy[species]) - set(images[species]))
        if unused:
            log.info("the taxonomy lists %d %s without images (not used), e.g. %s", len(unused), species, unused[:3])
    if images.empty:
        raise DatasetError(f"{source}: no images listed")
    same_file = images["path"].map(os.path.normpath)
    duplicated = same_file[same_file.duplicated(keep=False)]
    if len(duplicated):
        rows = [int(i) + 2 for i in duplicated.index[duplicated == duplicated.iloc[0]]]
        raise DatasetError(f"{source}: image {duplicated.iloc[0]!r} is listed more than once (rows {rows}, line "
                           "numbers of a manifest)")
    derived = "image_id" not in images.columns
    if derived:
        images["image_id"] = [image_id_from_path(p) for p in images["path"]]
    duplicated = images[images["image_id"].duplicated(keep=False)]
    if len(duplicated):
        hint = " (ids are made from split/species/name of the path: add an image_id column)" if derived else ""
        raise DatasetError(f"{source}: duplicate image_id {duplicated['image_id'].iloc[0]!r} "
                           f"({list(duplicated['path'].iloc[:2])}){hint}")

    reasons = pd.Series(check_images(images["path"], workers, progress), index=images.index, dtype=object)
    bad = reasons.notna()
    rejects = pd.concat([images[bad].assign(reason=reasons[bad]), skipped], ignore_index=True)[
        ["path", "image_id", "reason", "split", species]]
    log_per_species(images[~bad], rejects, species)
    if bad.mean() > max_reject_fraction:
        examples = "; ".join(f"{p}: {r}" for p, r in zip(images.loc[bad, "path"][:3], reasons[bad][:3]))
        raise DatasetError(f"{source}: {int(bad.sum())} of {len(images)} images rejected, more than the allowed "
                           f"{max_reject_fraction:.1%} (data.max_reject_fraction), e.g. {examples}")
    manifest = images[~bad].reset_index(drop=True)
    if manifest.empty:
        raise DatasetError(f"{source}: none of the {len(images)} images can be used, e.g. "
                           f"{rejects['path'].iloc[0]}: {rejects['reason'].iloc[0]}")
    check_training_images(manifest, rejects, species, source)
    extra = [c for c in manifest.columns if c not in ("image_id", "path", "split", *ranks)]
    manifest = manifest[["image_id", "path", "split", *ranks, *extra]]
    classes = class_table(manifest, ranks, source)
    return manifest, classes, rejects[["path", "image_id", "reason"]].astype(str)


def log_per_species(taken: pd.DataFrame, rejects: pd.DataFrame, species: str) -> None:
    """One log line per species: images taken per split, rejected and skipped (the reasons are in rejects)."""
    skipped = rejects["reason"].str.startswith(SKIPPED)
    counts = pd.concat([pd.crosstab(taken[species], taken["split"]).reindex(columns=list(SPLITS), fill_value=0),
                        rejects[~skipped][species].value_counts().rename("rejected"),
                        rejects[skipped & (rejects[species] != "")][species].value_counts().rename("skipped")],
                       axis=1).fillna(0).astype(int)
    for name, row in counts.sort_index().iterrows():
        log.info("%s: %d images taken (%s), %d rejected, %d skipped", name, row[list(SPLITS)].sum(),
                 ", ".join(f"{split} {row[split]}" for split in SPLITS), row["rejected"], row["skipped"])


def check_training_images(manifest: pd.DataFrame, rejects: pd.DataFrame, species: str, source: str) -> None:
    """Every species of the dataset (its images, rejected and skipped files included) needs a usable training
    image, and there must be two species at least; a DatasetError names the species and what became of its files."""
    trained = set(manifest.loc[manifest["split"] == "train", species])
    listed = (set(manifest[species]) | set(rejects[species])) - {""}
    untrained = sorted(listed - trained)
    if untrained:
        name = untrained[0]
        lost = rejects[(rejects[species] == name) & (rejects["split"] == "train")]
        kept = manifest.loc[manifest[species] == name, "split"].value_counts().to_dict()
        because = f"; its {len(lost)} training files: e.g. {lost['path'].iloc[0]}: {lost['reason'].iloc[0]}" \
            if len(lost) else ""
        also = f" ({len(untrained) - 1} more: {untrained[1:4]})" if len(untrained) > 1 else ""
        raise DatasetError(f"{source}: {species} {name!r} has no training images (usable: {kept or 'none'}{because})"
                           f"{also}")
    if len(trained) < 2:
        raise DatasetError(f"{source}: a single {species} ({sorted(trained)[0]!r}): nothing to tell apart; taxotrait "
                           f"needs two {species} at least")


def image_id_from_path(path: str) -> str:
    """A readable id: the image's split/species/name without extension."""
    parts = Path(path).with_suffix("").parts
    return "/".join(parts[-3:])


def class_table(manifest: pd.DataFrame, ranks: list[str], source: str) -> pd.DataFrame:
    """One row per (rank, taxon): class_index (sorted names), parent and image counts per split; a warning names a
    rank with a single taxon."""
    tables = []
    for depth, rank in enumerate(ranks):
        counts = pd.crosstab(manifest[rank], manifest["split"]).reindex(columns=list(SPLITS), fill_value=0)
        if len(counts) == 1 and rank != ranks[-1]:
            log.warning("%s: %s has a single taxon (%r): nothing to contrast at this rank", source, rank,
                        counts.index[0])
        parents = manifest.groupby(rank)[ranks[depth - 1]].first() if depth else pd.Series("", index=counts.index)
        table = pd.DataFrame({
            "rank": rank,
            "class_index": range(len(counts)),
            "taxon": counts.index.astype(str),
            "parent": parents.reindex(counts.index).values,
            **{f"n_{split}": counts[split].values.astype("int64") for split in SPLITS},
        })
        tables.append(table)
    classes = pd.concat(tables, ignore_index=True)
    classes["class_index"] = classes["class_index"].astype("int64")
    return classes


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
    of `ranks`, the images decoded in `workers` processes."""
    if data.get("images"):
        images, source = scan_image_tree(data["images"]), data["images"]
        images = images.rename(columns={"species": ranks[-1]})
    else:
        images, source = read_manifest(inputs["manifest"]), inputs["manifest"]
    taxonomy = read_taxonomy(inputs["taxonomy"], ranks) if inputs.get("taxonomy") else None
    if inputs.get("tree"):
        from .taxonomy import check_leaves, tree_taxonomy

        taxonomy = tree_taxonomy(inputs["tree"], ranks)
        check_leaves(taxonomy, images[ranks[-1]], str(inputs["tree"]))
    manifest, classes, rejects = prepare_dataset(images, taxonomy, ranks, source, data["max_reject_fraction"],
                                                 workers=workers)
    for table, key in ((manifest, "manifest"), (classes, "classes"), (rejects, "rejects")):
        write_parquet(table, outputs[key])
    skipped = rejects["reason"].str.startswith(SKIPPED)
    log.info("%d images, %d rejected, %d other files skipped; classes per rank: %s", len(manifest),
             int((~skipped).sum()), int(skipped.sum()), classes.groupby("rank", sort=False).size().to_dict())


def taxa_per_rank(data: dict, ranks: list[str]) -> dict[str, int]:
    """How many taxa each rank has in a user's dataset (`data.images` or `data.manifest`, with `data.taxonomy` or
    `data.tree`), read from its tables and the image tree's folder names alone (no image is opened), before any job
    runs."""
    species = ranks[-1]
    if data.get("images"):
        table, present = None, species_folders(data["images"])
    else:
        table = read_manifest(data["manifest"])
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
    file a manifest names): a params value of the prepare rule, so that new, removed or replaced images re-run it.
    Empty for the synthetic demo, whose images the workflow makes."""
    if data.get("images"):
        return image_tree_fingerprint(data["images"])
    if not data.get("manifest"):
        return ""
    return listing_digest(read_manifest(data["manifest"])["path"])
