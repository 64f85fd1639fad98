"""The configuration schema (workflow/schemas/config.schema.yaml): the one place the settings' defaults live.

`with_defaults` fills a config's missing keys from the schema's `default:`s (the workflow does so at start-up,
before validating); `defaults()` is the whole default configuration, for a notebook.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def load_schema(path: str | os.PathLike = SCHEMA) -> dict:
    """The schema at `path` (a copy: callers may change it)."""
    return copy.deepcopy(_load(str(path)))


def _resolve(node: dict, schema: dict) -> dict:
    """`node` with a local `$ref` (#/$defs/...) followed, its own keys (e.g. `default`) on top."""
    if "$ref" not in node:
        return node
    target = schema
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _object_branch(node: dict) -> dict | None:
    """The schema that describes a mapping value of `node` (itself, or its object branch of a oneOf/anyOf)."""
    if "properties" in node:
        return node
    for branch in node.get("oneOf", []) + node.get("anyOf", []):
        if branch.get("type") == "object" and "properties" in branch:
            return branch
    return None


def _fill(value: dict, node: dict, schema: dict) -> None:
    for key, sub in node["properties"].items():
        sub = _resolve(sub, schema)
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        branch = _object_branch(sub)
        if isinstance(value.get(key), dict) and branch is not None:
            _fill(value[key], branch, schema)


def with_defaults(config: dict, path: str | os.PathLike = SCHEMA) -> dict:
    """`config` (changed in place, and returned) with every key it lacks set to the schema's default, nested sections
    included; a mapping under `additionalProperties` (`rank_overrides`) stays as given: it overrides only its keys."""
    schema = _load(str(path))
    _fill(config, schema, schema)
    return config


def defaults(path: str | os.PathLike = SCHEMA) -> dict:
    """The default configuration: every key at its schema default (`data.synthetic` null: no data source yet)."""
    return with_defaults({}, path)
