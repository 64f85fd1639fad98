# Frozen tokens entering the first prompted block, computed once per dataset and shared by every rank.
rule cache_tokens:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
        weights=backbone_weights(),
    output:
        tokens=f"{RESULTS}/cache/{{kind}}.tokens.npy",
        meta=f"{RESULTS}/cache/{{kind}}.tokens.npy.json",
    log:
        f"{LOGS}/cache_tokens.{{kind}}.log",
    benchmark:
        f"{BENCH}/cache_tokens.{{kind}}.tsv"
    wildcard_constraints:
        kind="train|eval",
    # one for the forward, the others decode images in worker processes (DECODE_THREADS, prepare.smk)
    threads: DECODE_THREADS
    resources:
        gpu=config["resources"]["gpu"],
    params:
        # the training views are drawn from train.seed
        settings=lambda wildcards: settings(
            "backbone",
            "model",
            "augment",
            "train.device",
            IMAGE_LIMIT,
            *(["train.seed"] if wildcards.kind == "train" else []),
        )(wildcards),
    script:
        "../scripts/cache_tokens.py"
