"""The workflow's steps: one function per rule, in one module per rules file (`workflow/rules/<file>.smk` ->
`taxotrait.steps.<file>`), the only code that reads the workflow's settings.

A rule passes its step exactly the settings it reads, as one `params:` value (`rule_settings`, through `settings()`
in common.smk): the rerun fingerprint is what the code reads. `workflow/scripts/` hand the step a `Settings`, which
stops with `SettingNotPassed` (naming the rule and the key) when the step reads a setting its rule does not pass. From
a notebook, a step takes the whole configuration (`taxotrait.schema.defaults()` with the data set) instead.

This module imports no torch: the Snakefile reads it when it plans the workflow.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping

from ..config import rank_train_settings


class SettingNotPassed(Exception):
    """A step read a setting its rule does not pass in `params: settings` (not a KeyError: `.get()` does not hide
    it)."""


def _dotted(path: Iterable[str]) -> str:
    return ".".join(path)


class Settings(Mapping):
    """The settings of one rule: nested mappings as in the config, holding only what the rule passes.

    `passed`: the dotted keys the rule passes (a section, e.g. `backbone`, or one key of it, e.g. `model.class_chunk`);
    reading anything else raises SettingNotPassed. Within a passed key, a missing optional key reads as absent (`get`
    gives its default), as in the config.
    """

    def __init__(self, values: Mapping, passed: Iterable[str], rule: str = "", prefix: tuple[str, ...] = ()):
        self._values, self._passed, self._rule, self._prefix = values, frozenset(passed), rule, prefix

    def passes(self, key: str) -> bool:
        """Whether the rule passes the dotted `key` (below this mapping's place), all of it or a part of it."""
        path = _dotted((*self._prefix, *key.split(".")))
        return any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in self._passed)

    def _check(self, key: str) -> None:
        if not self.passes(str(key)):
            rule = f"rule {self._rule}" if self._rule else "this step"
            raise SettingNotPassed(f"{rule} reads the setting {_dotted((*self._prefix, str(key)))}, which its params: "
                                   f"settings do not pass (passed: {', '.join(sorted(self._passed)) or 'none'}); add "
                                   "it to the rule's settings(...) in workflow/rules/")

    def __getitem__(self, key: str):
        self._check(key)
        value = self._values[key]
        return Settings(value, self._passed, self._rule, (*self._prefix, key)) if isinstance(value, Mapping) else value

    def get(self, key: str, default=None):
        self._check(key)
        return self[key] if key in self._values else default

    def __contains__(self, key) -> bool:
        self._check(key)
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def as_dict(self) -> dict:
        """The passed values as plain, JSON-serialisable dicts."""
        return json.loads(json.dumps(self._values))

    @classmethod
    def from_params(cls, text: str | None, rule: str = "") -> "Settings":
        """The Settings of a rule's `params: settings` value (`rule_settings`); none when the rule passes none."""
        payload = json.loads(text) if text else {"passed": [], "values": {}}
        return cls(payload["values"], payload["passed"], rule)


def for_rank(config: Mapping, rank: str | None) -> dict:
    """`config` with `train` as the section of `rank` (its `rank_overrides` applied): what a rule with a {rank}
    wildcard passes, and what a notebook passes a rank's step."""
    return {**config, "train": rank_train_settings(config, rank)} if "train" in config else dict(config)


def select(config: Mapping, keys: Iterable[str], rank: str | None = None) -> dict:
    """The nested values of the dotted `keys` of `config` (a key the config lacks is left out); under a `rank`, of
    `for_rank(config, rank)`."""
    config = for_rank(config, rank)
    values: dict = {}
    for key in keys:
        source, target, parts = config, values, key.split(".")
        for part in parts[:-1]:
            source = source.get(part) or {}
            target = target.setdefault(part, {})
        if parts[-1] in source:
            target[parts[-1]] = source[parts[-1]]
    return values


def rule_settings(config: Mapping, keys: Iterable[str], rank: str | None = None) -> str:
    """A rule's `params: settings` value: the passed `keys` and their values (`select`) as one JSON string, so that
    changing any of them re-runs the rule, and nothing else does."""
    keys = sorted(set(keys))
    return json.dumps({"passed": keys, "values": select(config, keys, rank)}, sort_keys=True)
