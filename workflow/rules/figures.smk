# Figures: trait galleries and shared traits per rank, and the coarse-to-fine view of every species.
from taxotrait import report as reporting

# processes drawing one job's figures (Snakemake gives a job at most --cores); key.smk's key_figure draws with as many.
# Each folder keeps every figure; the report shows figures.report_galleries of them and the folder's index.html.
FIGURE_THREADS = 8


rule figures:
    input:
        attention=f"{RESULTS}/{{rank}}/attention.h5",
        traits=f"{RESULTS}/{{rank}}/traits.parquet",
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        figures=report(
            directory(f"{RESULTS}/{{rank}}/figures"),
            patterns=reporting.REPORT_PATTERNS,
            caption="../report/figures.rst",
            category=reporting.category("Trait galleries"),
            subcategory=lambda wildcards: reporting.rank_subcategory(wildcards.rank, RANKS),
            labels=lambda wildcards, output: reporting.result_labels(output.figures, wildcards.name),
        ),
    log:
        f"{LOGS}/figures.{{rank}}.log",
    benchmark:
        f"{BENCH}/figures.{{rank}}.tsv"
    threads: FIGURE_THREADS
    params:
        settings=settings("figures", "augment.resize", IMAGE_LIMIT),
    script:
        "../scripts/figures_rank.py"


rule hierarchy_figures:
    input:
        attention=expand(f"{RESULTS}/{{rank}}/attention.h5", rank=RANKS),
        hierarchy=f"{RESULTS}/hierarchy_traits.parquet",
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        figures=report(
            directory(f"{RESULTS}/figures/hierarchy"),
            patterns=reporting.REPORT_PATTERNS,
            caption="../report/hierarchy.rst",
            category=reporting.category("Coarse to fine"),
            labels=lambda wildcards, output: reporting.result_labels(output.figures, wildcards.name),
        ),
    log:
        f"{LOGS}/hierarchy_figures.log",
    benchmark:
        f"{BENCH}/hierarchy_figures.tsv"
    threads: FIGURE_THREADS
    params:
        settings=settings("ranks", "figures", "augment.resize", IMAGE_LIMIT),
    script:
        "../scripts/figures_hierarchy.py"
