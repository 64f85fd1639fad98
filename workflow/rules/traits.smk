# Trait tables: per rank, and the coarse-to-fine table of every species.
rule traits:
    input:
        heads=f"{RESULTS}/{{rank}}/heads.parquet",
    output:
        traits=f"{RESULTS}/{{rank}}/traits.parquet",
    log:
        f"{LOGS}/traits.{{rank}}.log",
    benchmark:
        f"{BENCH}/traits.{{rank}}.tsv"
    script:
        "../scripts/traits.py"


rule hierarchy_traits:
    input:
        heads=expand(f"{RESULTS}/{{rank}}/heads.parquet", rank=RANKS),
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        hierarchy=f"{RESULTS}/hierarchy_traits.parquet",
    log:
        f"{LOGS}/hierarchy_traits.log",
    benchmark:
        f"{BENCH}/hierarchy_traits.tsv"
    script:
        "../scripts/hierarchy_traits.py"
