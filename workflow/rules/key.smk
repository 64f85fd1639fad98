# The key: at every fork of the tree, the trait heads that tell each child from its siblings.
from taxotrait import report as reporting


rule key:
    input:
        key_entries=expand(f"{RESULTS}/{{rank}}/key.parquet", rank=RANKS),
        classes=f"{RESULTS}/classes.parquet",
    output:
        table=f"{RESULTS}/key.parquet",
        markdown=f"{RESULTS}/key.md",
        html=report(
            f"{RESULTS}/key.html",
            caption="../report/key.rst",
            category=reporting.category("Key"),
            labels=reporting.labels(kind="key"),
        ),
    log:
        f"{LOGS}/key.log",
    benchmark:
        f"{BENCH}/key.tsv"
    params:
        settings=settings(*reporting.KEY_SETTINGS),  # shown in key.html
    script:
        "../scripts/key.py"


rule key_figure:
    input:
        key=f"{RESULTS}/key.parquet",
        classes=f"{RESULTS}/classes.parquet",
        attention=expand(f"{RESULTS}/{{rank}}/attention.h5", rank=RANKS),
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        pages=report(
            directory(f"{RESULTS}/figures/key"),
            patterns=reporting.REPORT_PATTERNS,
            caption="../report/key_figure.rst",
            category=reporting.category("Key"),
            labels=lambda wildcards, output: reporting.result_labels(output.pages, wildcards.name),
        ),
    log:
        f"{LOGS}/key_figure.log",
    benchmark:
        f"{BENCH}/key_figure.tsv"
    threads: FIGURE_THREADS  # figures.smk
    params:
        settings=settings("ranks", "augment.resize", "figures.report_galleries", IMAGE_LIMIT),
    script:
        "../scripts/key_figure.py"
