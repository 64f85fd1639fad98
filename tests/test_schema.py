"""The schema is the one place the defaults live: config/config.yaml and config/README.md agree with it."""
import re
from pathlib import Path

import pytest
import yaml

from taxotrait.config import validate_config
from taxotrait.errors import ConfigError
from taxotrait.schema import SCHEMA, defaults, load_schema, with_defaults

REPO = Path(__file__).resolve().parents[1]


def schema_defaults():
    """{dotted key: default} of every leaf key of the schema (data.synthetic's keys through its object branch)."""
    schema, found = load_schema(), {}

    def walk(node, prefix):
        if "$ref" in node:
            node = {**schema["$defs"][node["$ref"].split("/")[-1]], **node}
        branches = [node] + [b for b in node.get("oneOf", []) if b.get("type") == "object"]
        properties = {k: v for b in branches for k, v in b.get("properties", {}).items()}
        if not properties:
            found[prefix] = node.get("default", KeyError)
        for key, sub in properties.items():
            walk(sub, f"{prefix}.{key}" if prefix else key)

    walk(schema, "")
    return found


def leaves(mapping, prefix=""):
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            yield from leaves(value, dotted)
        else:
            yield dotted, value


def test_every_schema_key_has_a_default_and_the_defaults_are_valid():
    missing = [key for key, default in schema_defaults().items() if default is KeyError]
    assert not missing, f"schema keys without a default: {missing}"
    validate_config(defaults(), SCHEMA)  # raises when a default breaks the schema
    assert defaults()["train"]["epochs"] == schema_defaults()["train.epochs"]


def test_config_yaml_gives_the_schema_defaults():
    config, known = yaml.safe_load((REPO / "config" / "config.yaml").read_text()), schema_defaults()
    for key, value in leaves(config):
        if key == "rank_overrides":
            assert value == {}
            continue
        assert key in known, f"config/config.yaml: {key} is not a schema key"
        assert value == known[key], f"config/config.yaml: {key} is {value!r}, its schema default is {known[key]!r}"


def test_readme_documents_every_key_with_its_schema_default():
    text = (REPO / "config" / "README.md").read_text()
    documented = {}
    for row in re.findall(r"^\| (`[^|]*) \| ([^|]*) \|", text, flags=re.M):
        names = re.findall(r"`([A-Za-z_.]+)`", row[0])
        if not names:
            continue
        prefix = names[0].rsplit(".", 1)[0] + "." if "." in names[0] else ""
        cells = [c.strip().strip("`") for c in row[1].split(",")]
        for index, name in enumerate(names):
            key = name if "." in name or index == 0 else prefix + name
            documented[key] = cells[index] if len(cells) == len(names) else row[1].strip().strip("`")
    known = schema_defaults()
    assert not sorted(set(known) - set(documented)), "schema keys missing from config/README.md"
    wrong = []
    for key, default in known.items():
        try:
            written = yaml.safe_load(documented[key])
        except yaml.YAMLError:
            continue  # prose ("see file", "the converted offline DINOv2 ViT-S/14")
        if isinstance(written, (int, float, bool, list)) or written is None:
            if written != default:
                wrong.append(f"{key}: README {documented[key]!r}, schema {default!r}")
    assert not wrong, "config/README.md disagrees with the schema:\n" + "\n".join(wrong)


def test_with_defaults_fills_what_is_missing_and_keeps_what_is_given():
    config = with_defaults({"train": {"epochs": 3}, "rank_overrides": {"species": {"lr": 0.1}},
                            "data": {"synthetic": {"n_orders": 3}}, "evaluation": {"faithfulness": {"images": 2}}})
    assert config["train"]["epochs"] == 3 and config["train"]["lr"] == schema_defaults()["train.lr"]
    assert config["rank_overrides"] == {"species": {"lr": 0.1}}  # overrides only the keys it gives
    assert config["data"]["synthetic"]["n_orders"] == 3 and config["data"]["synthetic"]["n_train"] == 80
    assert config["evaluation"]["faithfulness"] == {"images": 2, "pixels_per_step": 6272, "finest_ranks": 1}
    assert with_defaults({})["data"]["synthetic"] is None  # no data source unless one is given
    with pytest.raises(ConfigError, match="train.epochs"):
        validate_config(with_defaults({"train": {"epochs": 0}}), SCHEMA)
