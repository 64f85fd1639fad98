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
        key_entries=f"{RESULTS}/{{rank}}/key.parquet",
    log:
        f"{LOGS}/traits.{{rank}}.log",
    benchmark:
        f"{BENCH}/traits.{{rank}}.tsv"
    params:
        settings=settings(*NAMING),
    script:
        "../scripts/traits.py"


rule hierarchy_traits:
    input:
        unpack(part_annotation_inputs),
        heads=expand(f"{RESULTS}/{{rank}}/heads.parquet", rank=RANKS),
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        hierarchy=f"{RESULTS}/hierarchy_traits.parquet",
    log:
        f"{LOGS}/hierarchy_traits.log",
    benchmark:
        f"{BENCH}/hierarchy_traits.tsv"
    params:
        settings=settings("ranks", *NAMING),
    script:
        "../scripts/hierarchy_traits.py"
