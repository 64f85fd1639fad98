# Figures: trait galleries and shared traits per rank, and the coarse-to-fine view of every species.
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
            category="Trait galleries",
            subcategory="{rank}",
        ),
    params:
        settings=lambda wildcards: params_json("figures", "augment"),
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
            category="Coarse to fine",
        ),
    params:
        settings=lambda wildcards: params_json("figures", "augment"),
    log:
        f"{LOGS}/hierarchy_figures.log",
    benchmark:
        f"{BENCH}/hierarchy_figures.tsv"
    script:
        "../scripts/figures_hierarchy.py"
