# Batched greedy head masking on correctly classified images: the trait heads of each image.
rule mask_heads:
    input:
        model=trained_model,
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        attention=f"{RESULTS}/{{rank}}/attention.h5",
        weights=backbone_weights(),
    output:
        heads=f"{RESULTS}/{{rank}}/heads.parquet",
    log:
        f"{LOGS}/mask_heads.{{rank}}.log",
    benchmark:
        f"{BENCH}/mask_heads.{{rank}}.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["gpu"],
    params:
        settings=settings(
            "backbone", "masking", "attention.split", "attention.batch_size", "model.class_chunk", "train.device"
        ),
    script:
        "../scripts/mask_heads.py"
