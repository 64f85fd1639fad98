# Attention maps of the true, predicted and sibling class prompts, streamed to HDF5.
rule extract_attention:
    input:
        model=trained_model,
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        attention=f"{RESULTS}/{{rank}}/attention.h5",
    log:
        f"{LOGS}/extract_attention.{{rank}}.log",
    benchmark:
        f"{BENCH}/extract_attention.{{rank}}.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["gpu"],
    params:
        settings=settings("backbone", "attention", "model.class_chunk", "train.device"),
    script:
        "../scripts/extract_attention.py"
