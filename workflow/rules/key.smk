# The key: at every fork of the tree, the trait heads that tell each child from its siblings.
rule key:
    input:
        traits=expand(f"{RESULTS}/{{rank}}/traits.parquet", rank=RANKS),
        classes=f"{RESULTS}/classes.parquet",
    output:
        table=f"{RESULTS}/key.parquet",
        markdown=report(f"{RESULTS}/key.md", caption="../report/key.rst", category="Key"),
    log:
        f"{LOGS}/key.log",
    benchmark:
        f"{BENCH}/key.tsv"
    script:
        "../scripts/key.py"


rule key_figure:
    input:
        key=f"{RESULTS}/key.parquet",
        classes=f"{RESULTS}/classes.parquet",
        attention=expand(f"{RESULTS}/{{rank}}/attention.h5", rank=RANKS),
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        figure=report(f"{RESULTS}/figures/key.png", caption="../report/key_figure.rst", category="Key"),
    params:
        settings=lambda wildcards: params_json("augment"),
    log:
        f"{LOGS}/key_figure.log",
    benchmark:
        f"{BENCH}/key_figure.tsv"
    script:
        "../scripts/key_figure.py"
