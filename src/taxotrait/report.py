"""What `snakemake --report report.html` shows: the order of its categories, the labels of every result (rank,
taxon, kind) and the HTML pages of the run's tables with the run's settings (summary.html, evaluation.html).

Snakemake's report lists categories and subcategories alphabetically, so `category` and `rank_subcategory` number
them ("2. Coarse to fine", "1. order"): the menu follows `CATEGORIES` and the ranks go coarse to fine. Figures carry
their labels in PNG text chunks (`png_labels`, written by `taxotrait.figures.save_figure`), which the report rules
read back with `figure_labels`.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

# The report's result categories, top to bottom.
CATEGORIES = ["Key", "Summary", "Coarse to fine", "Trait galleries", "Evaluation"]
LABELS = ("rank", "taxon", "kind")  # every result's labels, in the order of the report's columns
ALL_RANKS, ALL_TAXA = "all ranks", "all taxa"
# The settings each page shows beside its tables (config sections, in this order).
SUMMARY_SETTINGS = ("dataset", "ranks", "contrast", "data", "backbone", "model", "augment", "train",
                    "rank_overrides", "attention", "masking")
KEY_SETTINGS = ("dataset", "ranks", "contrast", "backbone", "masking")
EVALUATION_SETTINGS = ("dataset", "ranks", "backbone", "attention", "evaluation")


def numbered(name: str, names: list[str]) -> str:
    """`name` prefixed with its place in `names` ("2. family"; zero-padded from 10 names on), so that sorting the
    prefixed names alphabetically keeps the order of `names`."""
    if name not in names:
        raise ValueError(f"{name!r} is not one of {names}")
    return f"{names.index(name) + 1:0{len(str(len(names)))}d}. {name}"


def category(name: str) -> str:
    """The report category `name` (one of `CATEGORIES`), numbered by its place in the menu."""
    return numbered(name, CATEGORIES)


def rank_subcategory(rank: str, ranks: list[str]) -> str:
    """The subcategory of `rank`, numbered coarse to fine ("1. order")."""
    return numbered(rank, list(ranks))


def labels(rank: str = ALL_RANKS, taxon: str = ALL_TAXA, kind: str = "") -> dict[str, str]:
    """A result's report labels."""
    return {"rank": str(rank), "taxon": str(taxon), "kind": str(kind)}


def png_labels(values: dict[str, str]) -> PngImagePlugin.PngInfo:
    """PNG text chunks holding a figure's report labels (`labels`); `figure_labels` reads them back."""
    info = PngImagePlugin.PngInfo()
    for key in LABELS:
        info.add_text(f"taxotrait:{key}", values[key])  # iTXt (UTF-8) where Latin-1 does not suffice
    return info


def figure_labels(folder: str | os.PathLike, name: str) -> dict[str, str]:
    """The report labels of figure `folder`/`name`.png (a figure written without them: its name as its kind).
    Braces are followed by a zero-width space: Snakemake would read "{x}" in a label as a wildcard."""
    path = Path(folder) / f"{name}.png"
    with Image.open(path) as image:
        text = getattr(image, "text", {})
    found = labels(kind=name) if f"taxotrait:{LABELS[0]}" not in text else {k: text[f"taxotrait:{k}"] for k in LABELS}
    return {key: value.replace("{", "{\u200b") for key, value in found.items()}


# ------------------------------------------------------------------------------------------------ pages
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2433; margin: 1.2em; }
.page { display: flex; flex-wrap: wrap; gap: 2.5em; align-items: flex-start; }
main { flex: 1 1 36em; } aside { flex: 0 1 26em; background: #f4f6f9; padding: 0.2em 1em 1em; border-radius: 6px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; margin: 1.2em 0 0.3em; }
table { border-collapse: collapse; margin: 0.4em 0 1em; }
th, td { border-bottom: 1px solid #d5dae3; padding: 0.25em 0.7em; text-align: left; }
th { background: #e9edf3; } tbody tr:nth-child(even) { background: #f7f8fa; }
td.number { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
aside table { width: 100%; }
aside td, aside th { font-size: 0.9em; padding: 0.15em 0.5em; } aside td:first-child { color: #566; }
li.missed { color: #a01c1c; } li.met { color: #1b6b2f; } p.jump { font-size: 0.9em; margin-top: -0.6em; }
"""
NUMBER = re.compile(r"^-?[\d.]+( \([\d.]+\))?$|^nan$")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(
        f'<td class="number">{html.escape(c)}</td>' if NUMBER.match(c) else f"<td>{html.escape(c)}</td>"
        for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_html(text: str) -> str:
    """HTML of the Markdown the summary steps write: headings (#, ##), pipe tables, "- " lists, paragraphs.
    List items saying "MISSED" get the class "missed", those saying "met" or "beats" the class "met"."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif match := re.match(r"(#{1,3}) (.*)", line):
            level = len(match[1])
            out.append(f"<h{level}>{html.escape(match[2])}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(_cells(lines[i]))
                i += 1
            rows = [row for row in block[1:] if not all(re.fullmatch(r"-+", c) for c in row)]
            out.append(_table(rows, block[0]))
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                item = lines[i][2:]
                kind = "missed" if "MISSED" in item else ("met" if re.search(r"\b(met|beats)\b", item) else "")
                items.append(f"<li{f' class={kind!r}' if kind else ''}>{html.escape(item)}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not re.match(r"#|\||- ", lines[i]):
                paragraph.append(lines[i])
                i += 1
            out.append(f"<p>{html.escape(' '.join(paragraph))}</p>")
    return "\n".join(out)


def _value(value) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " → ".join(value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def settings_html(config: Mapping, sections: tuple[str, ...]) -> str:
    """The run's settings: one small table per config section (nested keys dotted), single values first."""
    single = [(name, config.get(name)) for name in sections if not isinstance(config.get(name), Mapping)]
    parts = [_table([[name, _value(value)] for name, value in single], ["setting", "value"])] if single else []
    for name in sections:
        section = config.get(name)
        if isinstance(section, Mapping):
            rows = [[key, _value(value)] for key, value in _flatten(section)] or [["(none)", ""]]
            parts.append(f"<h3>{html.escape(name)}</h3>" + _table(rows, ["key", "value"]))
    return "\n".join(parts)


def _flatten(section: Mapping, prefix: str = ""):
    for key, value in section.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def page_html(markdown: str, config: Mapping, sections: tuple[str, ...]) -> str:
    """The self-contained HTML page (inline style) of `markdown`, a summary step's tables, with the settings
    `sections` of `config` beside them."""
    body = markdown_html(markdown)
    title = re.search(r"<h1>(.*?)</h1>", body)
    body = re.sub(r"(</h1>)", r'\1<p class="jump"><a href="#settings">Settings of this run</a></p>', body, count=1)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title[1] if title else "taxotrait"}'
            f"</title><style>{STYLE}</style></head><body><div class=\"page\"><main>{body}</main>"
            f'<aside id="settings"><h2>Settings of this run</h2>{settings_html(config, sections)}</aside></div>'
            "</body></html>\n")
