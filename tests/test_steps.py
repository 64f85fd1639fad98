"""The steps layer (taxotrait.steps): one function per rule, in one module per rules file, reading only the settings
its rule passes in `params: settings`, which are its rerun fingerprint."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from taxotrait.runner import ALLOCATOR_ENVIRONMENT, run_step, tune_allocator
from taxotrait.schema import defaults
from taxotrait.steps import Settings, SettingNotPassed, rule_settings

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "workflow" / "rules"


def demo_config() -> dict:
    config = defaults()
    config["data"]["synthetic"] = {"n_orders": 2}
    config["rank_overrides"] = {"species": {"epochs": 7}}
    return config


def test_a_step_reading_a_setting_its_rule_does_not_pass_stops_naming_the_rule_and_the_key():
    settings = Settings.from_params(rule_settings(demo_config(), ["ranks", "model.class_chunk", "backbone"]), "demo")
    assert settings["ranks"] == demo_config()["ranks"] and settings["model"]["class_chunk"] is None
    assert settings["backbone"]["img_size"] == 224 and "precision" in settings["backbone"]
    for read in (lambda: settings["train"], lambda: settings.get("train", {}), lambda: "train" in settings,
                 lambda: settings["model"]["variant"], lambda: settings["model"].get("variant")):
        with pytest.raises(SettingNotPassed, match=r"rule demo reads the setting (train|model\.variant), which"):
            read()
    assert settings.passes("model.class_chunk") and settings.passes("model") and not settings.passes("model.variant")


def test_a_rank_rule_passes_the_rank_train_settings_and_its_fingerprint_follows_what_it_passes():
    config = demo_config()
    species = json.loads(rule_settings(config, ["train.epochs"], "species"))
    assert species == {"passed": ["train.epochs"], "values": {"train": {"epochs": 7}}}
    assert json.loads(rule_settings(config, ["train.epochs"], "order"))["values"]["train"]["epochs"] == 15
    before = rule_settings(config, ["backbone", "train.seed"])
    config["train"]["lr"] = 1.0  # not passed: the fingerprint stays
    assert rule_settings(config, ["backbone", "train.seed"]) == before
    config["backbone"]["img_size"] = 112  # passed: it changes
    assert rule_settings(config, ["backbone", "train.seed"]) != before
    assert rule_settings(config, ["train.seed", "backbone"]) == rule_settings(config, ["backbone", "train.seed"])


def job(tmp_path, settings_text, rule="key", **files):
    """What Snakemake hands a workflow script: the rule's inputs, outputs, params, log, threads and rule name."""
    return SimpleNamespace(input=files.get("input", {}), output=files.get("output", {}), rule=rule, threads=1,
                           params=SimpleNamespace(get=lambda key, default=None: settings_text if key == "settings"
                                                  else default),
                           log=[str(tmp_path / "step.log")])


def key_files(tmp_path):
    classes = pd.DataFrame({"rank": ["order", "order"], "class_index": [0, 1], "taxon": ["A", "B"], "parent": ""})
    classes.to_parquet(tmp_path / "classes.parquet")
    from conftest import heads_table
    from taxotrait.traits import key_entries

    rows = [(f"{taxon}{i}", "order", taxon, head, True, 0.5, 0.5) for taxon, head in (("A", 1), ("B", 2))
            for i in range(2)]
    heads = heads_table(rows, ["image_id", "rank", "taxon", "head", "is_trait_head", "peak_x", "peak_y"])
    key_entries(heads).to_parquet(tmp_path / "entries.parquet")
    return ({"key_entries": [tmp_path / "entries.parquet"], "classes": tmp_path / "classes.parquet"},
            {"table": tmp_path / "key.parquet", "markdown": tmp_path / "key.md", "html": tmp_path / "key.html"})


def test_run_step_hands_the_step_only_what_its_rule_passes(tmp_path):
    """The key step through the script adapter: with the key rule's settings it writes the key; with a rule that
    leaves out `ranks`, which the step reads, it stops before writing anything."""
    from taxotrait.report import KEY_SETTINGS
    from taxotrait.steps.key import key

    config = {**demo_config(), "ranks": ["order"], "dataset": "demo"}
    inputs, outputs = key_files(tmp_path)
    run_step(job(tmp_path, rule_settings(config, KEY_SETTINGS), input=inputs, output=outputs),
             lambda s, settings: key(s.input, s.output, settings))
    assert pd.read_parquet(outputs["table"])["taxon"].tolist() == ["A", "B"]
    assert "Settings of this run" in outputs["html"].read_text()
    for path in outputs.values():
        path.unlink()
    short = [name for name in KEY_SETTINGS if name != "ranks"]
    with pytest.raises(SettingNotPassed, match="rule key reads the setting ranks"):
        run_step(job(tmp_path, rule_settings(config, short), input=inputs, output=outputs),
                 lambda s, settings: key(s.input, s.output, settings))
    assert not any(path.exists() for path in outputs.values())
    assert "SettingNotPassed" in (tmp_path / "step.log").read_text()


def rules_of(path: Path) -> list[str]:
    return re.findall(r"^\s*rule (\w+):", path.read_text(), flags=re.M)


def test_the_steps_mirror_the_rules_and_only_the_steps_read_settings():
    """Every rules file has its steps module, with one function per rule of the same name; every workflow script
    calls its step through run_step and none reads the workflow config."""
    for path in sorted(RULES.glob("*.smk")):
        if path.stem == "common":
            continue
        module = REPO / "src" / "taxotrait" / "steps" / f"{path.stem}.py"
        assert module.is_file(), f"{path.name} has no steps module {module.name}"
        functions = {node.name for node in ast.parse(module.read_text()).body if isinstance(node, ast.FunctionDef)}
        for rule in rules_of(path):
            assert rule in functions, f"rule {rule} ({path.name}) has no step {module.stem}.{rule}"
    for script in sorted((REPO / "workflow" / "scripts").glob("*.py")):
        text = script.read_text()
        assert "run_step(snakemake" in text, script.name
        assert not re.search(r"\bs\.config\b|snakemake\.config", text), f"{script.name} reads the workflow config"
    for module in sorted((REPO / "src" / "taxotrait").rglob("*.py")):
        assert not re.search(r"snakemake\.config", module.read_text()), module


def test_every_rule_with_a_script_passes_its_settings_through_settings():
    """A rule's step receives its settings from `params: settings` and nothing else: no rule keeps a hand-made
    fingerprint beside it (the prepare rule's image listing is a fingerprint of files, not of settings)."""
    for path in sorted(RULES.glob("*.smk")):
        text = path.read_text()
        for block in re.split(r"^\s*rule ", text, flags=re.M)[1:]:
            name = block.split(":", 1)[0]
            params = re.search(r"params:\n((?:\s{8,}.*\n)+)", block)
            if params is None:
                assert name == "convert_backbone", f"rule {name} passes no settings"
                continue
            keys = re.findall(r"^\s+(\w+)=", params[1], flags=re.M)
            assert keys[0] == "settings" and set(keys) <= {"settings", "images"}, (name, keys)


FAULTS = """
import resource, numpy as np
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # what a forward does: buffers of a few MB allocated and freed again, batch after batch
    buffers = [np.ones((1 << 20) + 4096 * k) for k in range(6)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def test_the_jobs_allocator_settings_keep_freed_memory_instead_of_faulting_it_in_again():
    """common.smk's tune_allocator: a job started with the workflow's environment reuses the memory a batch freed
    (page faults), and a value the user set is kept."""
    plain = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENVIRONMENT}
    tuned = dict(plain)
    tune_allocator(tuned)
    assert {k: tuned[k] for k in ALLOCATOR_ENVIRONMENT} == ALLOCATOR_ENVIRONMENT
    faults = [int(subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True,
                                 check=True).stdout) for env in (plain, tuned)]
    assert faults[1] * 10 < faults[0], faults
    mine = {"MALLOC_TRIM_THRESHOLD_": "0"}
    tune_allocator(mine)
    assert mine["MALLOC_TRIM_THRESHOLD_"] == "0" and mine["MALLOC_MMAP_THRESHOLD_"] == ALLOCATOR_ENVIRONMENT["MALLOC_MMAP_THRESHOLD_"]
