"""What `snakemake --report report.html` shows: the order of its categories, the labels of every result (rank,
taxon, kind) and the HTML pages of the run's tables with the run's settings (summary.html, evaluation.html), and what the report shows of a figures folder.

Snakemake's report lists categories and subcategories alphabetically, so `category` and `rank_subcategory` number
them ("2. Coarse to fine", "1. order"): the menu follows `CATEGORIES` and the ranks go coarse to fine. Figures carry
their labels in PNG text chunks (`png_labels`, written by `taxotrait.figures.save_figure`), which the report rules
read back with `figure_labels`.

The report embeds every file its patterns match, so a folder of one figure per taxon would grow it without bound.
A figures folder keeps every figure on disk; `publish_figures` links the ones the report shows (a bounded selection,
`evenly_spaced` over the taxa, `figures.report_galleries`) into its `report/` subfolder and writes its `index.html`,
a link to every figure of the folder. The rules' `REPORT_PATTERNS` match those two, `result_labels` labels them.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from urllib.parse import quote
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

from .io import atomic_write

# The report's result categories, top to bottom.
CATEGORIES = ["Key", "Summary", "Coarse to fine", "Trait galleries", "Evaluation"]
LABELS = ("rank", "taxon", "kind")  # every result's labels, in the order of the report's columns
ALL_RANKS, ALL_TAXA = "all ranks", "all taxa"
# The settings each page shows beside its tables (config sections, in this order).
SUMMARY_SETTINGS = ("dataset", "ranks", "contrast", "data", "backbone", "model", "augment", "train",
                    "rank_overrides", "attention", "masking")
KEY_SETTINGS = ("dataset", "ranks", "contrast", "backbone", "masking")
EVALUATION_SETTINGS = ("dataset", "ranks", "backbone", "attention", "evaluation")
# A figures folder's part of the report: the figures it shows (in this subfolder) and its index page (INDEX.html).
REPORT_FOLDER, INDEX = "report", "index"
REPORT_PATTERNS = [f"{REPORT_FOLDER}/{{name}}.png", f"{{name,{INDEX}}}.html"]  # a directory output's report patterns


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
    """The report labels of figure `folder`/`name`.png (a figure written without them: its name as its kind)."""
    path = Path(folder) / f"{name}.png"
    with Image.open(path) as image:
        text = getattr(image, "text", {})
    found = labels(kind=name) if f"taxotrait:{LABELS[0]}" not in text else {k: text[f"taxotrait:{k}"] for k in LABELS}
    return _without_wildcards(found)


def _without_wildcards(found: dict[str, str]) -> dict[str, str]:
    """Braces followed by a zero-width space: Snakemake would read "{x}" in a label as a wildcard."""
    return {key: value.replace("{", "{\u200b") for key, value in found.items()}


def result_labels(folder: str | os.PathLike, name: str) -> dict[str, str]:
    """The report labels of result `name` of a figures folder (`REPORT_PATTERNS`): its index page (`INDEX`: the
    labels in folder/index.html's meta tags) or a figure the report shows (folder/report/`name`.png)."""
    if name != INDEX:
        return figure_labels(Path(folder) / REPORT_FOLDER, name)
    text = (Path(folder) / f"{INDEX}.html").read_text(encoding="utf-8")
    found = dict(re.findall(r'<meta name="taxotrait:(\w+)" content="([^"]*)">', text))
    return _without_wildcards({key: html.unescape(found[key]) for key in LABELS})


def evenly_spaced(n: int, k: int) -> list[int]:
    """`k` of the indices 0 .. n-1, evenly spread over them, the first and the last included (all when n <= k)."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [0] * k
    return [i * (n - 1) // (k - 1) for i in range(k)]


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


def publish_figures(folder: str | os.PathLike, figures: list[tuple[Path, dict[str, str]]], shown: list[Path],
                    title: str, index_labels: dict[str, str]) -> Path:
    """What the report shows of a figures folder: the figures `shown` linked into folder/report/ (hard links, copies
    where the file system has none; the rest of that subfolder removed), and folder/index.html, `title` and a relative
    link to every figure of `figures` ((path, report labels), in their order), grouped by rank, those the report shows
    marked, with `index_labels` (`labels`) as its report labels. Returns the index's path."""
    folder = Path(folder)
    selected = folder / REPORT_FOLDER
    selected.mkdir(parents=True, exist_ok=True)
    for old in selected.iterdir():
        old.unlink()
    for path in shown:
        try:
            os.link(path, selected / path.name)
        except OSError:
            shutil.copyfile(path, selected / path.name)
    with atomic_write(folder / f"{INDEX}.html") as tmp:
        Path(tmp).write_text(index_html(figures, {path.name for path in shown}, title, index_labels), encoding="utf-8")
    return folder / f"{INDEX}.html"


def index_html(figures: list[tuple[Path, dict[str, str]]], shown: set[str], title: str,
               index_labels: dict[str, str]) -> str:
    """The index page of a figures folder (`publish_figures`): a list of links to the figures, relative to the page,
    one list per rank (in the order the figures first name it), each entry the figure's taxon and kind."""
    by_rank: dict[str, list[str]] = {}
    for path, found in figures:
        mark = " · <em>in the report</em>" if path.name in shown else ""
        by_rank.setdefault(found["rank"], []).append(
            f'<li><a href="{html.escape(quote(path.name))}">{html.escape(found["taxon"])}</a> · '
            f'{html.escape(found["kind"])}{mark}</li>')
    lists = "".join(f"<h2>{html.escape(rank)} ({len(items)})</h2><ul>{''.join(items)}</ul>"
                    for rank, items in by_rank.items()) or "<p>No figure: the step's log says why.</p>"
    meta = "".join(f'<meta name="taxotrait:{key}" content="{html.escape(index_labels[key])}">' for key in LABELS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{meta}<title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(figures)} figures, {len(shown)} of them shown in the report (spread evenly over this list, "
            "<code>figures.report_galleries</code>). The links open the PNG files beside this page, in the run's "
            f"results folder.</p>{lists}</body></html>\n")
