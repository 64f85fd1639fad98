# Trait tables: per rank, and the coarse-to-fine table of every species. Where there is ground truth (masks or part
# keypoints), each trait is named after the part its head points to.
NAMING = ("augment.resize", "backbone.img_size", "evaluation.parts", IMAGE_LIMIT)  # taxotrait.steps.traits.named_heads
rule traits:
    input:
        unpack(part_annotation_inputs),
        heads=f"{RESULTS}/{{rank}}/heads.parquet",
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        traits=f"{RESULTS}/{{rank}}/traits.parquet",
    params:
        settings=settings(*NAMING),
    log:
        f"{LOGS}/traits.{{rank}}.log",
    benchmark:
        f"{BENCH}/traits.{{rank}}.tsv"
    script:
        "../scripts/traits.py"


rule hierarchy_traits:
    input:
        unpack(part_annotation_inputs),
        heads=expand(f"{RESULTS}/{{rank}}/heads.parquet", rank=RANKS),
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        hierarchy=f"{RESULTS}/hierarchy_traits.parquet",
    params:
        settings=settings("ranks", *NAMING),
    log:
        f"{LOGS}/hierarchy_traits.log",
    benchmark:
        f"{BENCH}/hierarchy_traits.tsv"
    script:
        "../scripts/hierarchy_traits.py"
