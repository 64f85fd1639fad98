# Figures: trait galleries and shared traits per rank, and the coarse-to-fine view of every species.
from taxotrait import report as reporting

rule figures:
    input:
        attention=f"{RESULTS}/{{rank}}/attention.h5",
        traits=f"{RESULTS}/{{rank}}/traits.parquet",
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        figures=report(
            directory(f"{RESULTS}/{{rank}}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category=reporting.category("Trait galleries"),
            subcategory=lambda wildcards: reporting.rank_subcategory(wildcards.rank, RANKS),
            labels=lambda wildcards, output: reporting.figure_labels(output.figures, wildcards.name),
        ),
    params:
        settings=settings("figures", "augment.resize", IMAGE_LIMIT),
    log:
        f"{LOGS}/figures.{{rank}}.log",
    benchmark:
        f"{BENCH}/figures.{{rank}}.tsv"
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
            patterns=["{name}.png"],
            caption="../report/hierarchy.rst",
            category=reporting.category("Coarse to fine"),
            labels=lambda wildcards, output: reporting.figure_labels(output.figures, wildcards.name),
        ),
    params:
        settings=settings("ranks", "figures", "augment.resize", IMAGE_LIMIT),
    log:
        f"{LOGS}/hierarchy_figures.log",
    benchmark:
        f"{BENCH}/hierarchy_figures.tsv"
    script:
        "../scripts/figures_hierarchy.py"
