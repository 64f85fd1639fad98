"""The tree of taxa: a phylogeny read from a Newick file as a rank table, and top-down prediction through it.

A Newick tree (`data.tree`) becomes the same table a taxonomy CSV gives (one row per species, one column per rank),
so every later step is the same for both:

- leaves are the species; their labels are kept as written (an underscore stays an underscore; quote a label with
  spaces or punctuation: ``'Turdus merula'``); branch lengths, support values and ``[comments]`` are ignored;
- an unnamed internal node with a single child is collapsed into it (it tells nothing apart); a named one is a
  monotypic taxon (a genus of one species) and kept;
- unnamed internal nodes are numbered in the order they appear: ``node 1``, ``node 2``, ...;
- the depth of a node (the root's children: 1) is its rank: the workflow's `ranks` must name every level down to
  the deepest leaf. A leaf above the deepest level sits at the last rank (the species) and its lineage is carried
  through the levels it skips by monotypic stand-ins named ``<leaf> [<rank>]``: at those forks it has no sibling,
  so they add no loss and the key lists them as monotypic.

Kept free of torch, so that the workflow can read a tree's depth when it starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DatasetError

STAND_IN = "{leaf} [{rank}]"


@dataclass
class Node:
    """A node of a parsed tree: its label ('' when unnamed) and children (none for a leaf)."""

    name: str
    children: list["Node"] = field(default_factory=list)


class _Parser:
    """A recursive-descent Newick parser with positions in its error messages."""

    _unquoted = re.compile(r"[^\s()\[\]',:;]+")
    _length = re.compile(r"[-+0-9.eE]+")

    def __init__(self, text: str, source: str):
        self.text, self.source, self.at = text, source, 0

    def fail(self, what: str):
        line = self.text.count("\n", 0, self.at) + 1
        near = self.text[max(0, self.at - 20): self.at + 20].replace("\n", " ")
        raise DatasetError(f"{self.source}: not a Newick tree: {what} at line {line}, character {self.at + 1} "
                           f"(near {near!r})")

    def skip(self):
        while self.at < len(self.text):
            if self.text[self.at].isspace():
                self.at += 1
            elif self.text[self.at] == "[":  # a comment
                end = self.text.find("]", self.at)
                if end < 0:
                    self.fail("an unclosed [comment]")
                self.at = end + 1
            else:
                return

    def peek(self) -> str:
        self.skip()
        return self.text[self.at] if self.at < len(self.text) else ""

    def label(self) -> str:
        if self.peek() == "'":
            self.at += 1
            out = []
            while True:
                end = self.text.find("'", self.at)
                if end < 0:
                    self.fail("an unclosed quoted label")
                out.append(self.text[self.at:end])
                self.at = end + 1
                if self.text.startswith("'", self.at):  # '' is a quote inside a quoted label
                    out.append("'")
                    self.at += 1
                else:
                    return "".join(out)
        match = self._unquoted.match(self.text, self.at)
        if not match:
            return ""
        self.at = match.end()
        return match.group()

    def subtree(self) -> Node:
        children = []
        if self.peek() == "(":
            self.at += 1
            children.append(self.subtree())
            while self.peek() == ",":
                self.at += 1
                children.append(self.subtree())
            if self.peek() != ")":
                self.fail("expected ',' or ')'")
            self.at += 1
        name = self.label().strip()
        if self.peek() == ":":  # a branch length (or support value): ignored
            self.at += 1
            self.skip()
            length = self._length.match(self.text, self.at)
            if not length:
                self.fail("expected a branch length after ':'")
            self.at = length.end()
        if not children and not name:
            self.fail("a leaf without a label")
        return Node(name, children)

    def tree(self) -> Node:
        if not self.text.strip():
            self.fail("the file is empty")
        root = self.subtree()
        if self.peek() != ";":
            self.fail("expected ';' at the end of the tree")
        self.at += 1
        if self.peek():
            self.fail("text after the tree's ';' (one tree per file)")
        return root


def parse_newick(text: str, source: str = "tree") -> Node:
    """The tree of a Newick string, single-child nodes collapsed, unnamed internal nodes numbered; DatasetError
    naming `source` and the position when it does not parse, or a duplicate label."""
    root = _collapse(_Parser(text, source).tree())
    if not root.children:
        raise DatasetError(f"{source}: the tree has a single leaf ({root.name!r}): nothing to tell apart")
    numbered = 0
    seen: dict[str, str] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        stack.extend(reversed(node.children))
        if node is root:
            continue
        if node.children and not node.name:
            numbered += 1
            node.name = f"node {numbered}"
        kind = "internal node" if node.children else "leaf"
        if node.name in seen:
            raise DatasetError(f"{source}: the label {node.name!r} is used twice ({seen[node.name]} and {kind}); "
                               "every leaf and named node needs its own")
        seen[node.name] = kind
    return root


def _collapse(node: Node, root: bool = True) -> Node:
    """`node` with every unnamed internal node of a single child replaced by that child (a named one is a monotypic
    taxon and kept); the root is never a rank, so a root of a single child is replaced by it whatever its name."""
    node.children = [_collapse(child, root=False) for child in node.children]
    while len(node.children) == 1 and (root or not node.name):
        node = node.children[0]
    return node


def tree_depth(root: Node) -> int:
    """Levels below the root down to the deepest leaf."""
    return 1 + max((tree_depth(child) for child in root.children), default=0) if root.children else 0


def read_tree(path: str | os.PathLike) -> Node:
    """Parse the Newick file at `path` (`parse_newick`)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"tree file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a UTF-8 text file (byte {err.start}): save the tree as UTF-8 Newick") from None
    return parse_newick(text, str(path))


def check_tree_ranks(path: str | os.PathLike, ranks: list[str], root: Node | None = None) -> Node:
    """The tree at `path` (or its parsed `root`); DatasetError when `ranks` does not name one rank per level."""
    root = read_tree(path) if root is None else root
    depth = tree_depth(root)
    if depth != len(ranks):
        raise DatasetError(f"{path}: the tree has {depth} level{'s' * (depth != 1)} below the root but ranks names {len(ranks)} "
                           f"({', '.join(ranks)}); set ranks to {depth} names, coarse to fine, the last for the leaves")
    return root


def tree_taxonomy(path: str | os.PathLike, ranks: list[str]) -> pd.DataFrame:
    """The rank table of the Newick tree at `path`: one row per leaf, one column per rank (see the module)."""
    root = check_tree_ranks(path, ranks)
    rows = []

    def walk(node: Node, lineage: list[str]):
        if not node.children:
            stand_ins = [STAND_IN.format(leaf=node.name, rank=rank) for rank in ranks[len(lineage):-1]]
            rows.append([*lineage, *stand_ins, node.name])
        for child in node.children:
            walk(child, [*lineage, node.name])

    for child in root.children:
        walk(child, [])
    return pd.DataFrame(rows, columns=ranks)


def check_leaves(taxonomy: pd.DataFrame, species: pd.Series, source: str) -> None:
    """Every leaf of the tree has images and every image's species is a leaf; DatasetError naming them otherwise."""
    leaves, named = set(taxonomy.iloc[:, -1]), set(species)
    strays = sorted(named - leaves)
    if strays:
        hint = [s for s in strays if s.replace(" ", "_") in leaves or s.replace("_", " ") in leaves]
        raise DatasetError(f"{source}: {len(strays)} species of the images are not leaves of the tree, e.g. "
                           f"{strays[:5]}" + (f" (the tree spells {hint[0]!r} with '_' or ' ' swapped; labels are "
                                              "compared as written)" if hint else ""))
    empty = sorted(leaves - named)
    if empty:
        raise DatasetError(f"{source}: {len(empty)} leaves of the tree have no images, e.g. {empty[:5]}; remove "
                           "them from the tree or add their images")


def parent_index(parents: list[str], names_above: list[str], source: str) -> np.ndarray:
    """Class index [C] at the coarser rank of each class's parent: `parents` (in class-index order) looked up in
    `names_above` (the coarser rank's class names in class-index order); DatasetError naming `source` when a parent
    is not a class there."""
    index = pd.Index(names_above).get_indexer(parents)
    if (index < 0).any():
        strays = sorted({parent for parent, i in zip(parents, index) if i < 0})
        raise DatasetError(f"{source}: {len(strays)} parents are not classes of the rank above, e.g. {strays[:5]}")
    return index.astype(np.int64)
