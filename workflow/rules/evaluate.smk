# Accuracy overall and per class on every split: flat, among siblings, and top-down (with the coarser ranks' models).
rule evaluate:
    input:
        model=trained_model,
        ancestors=coarser_models,
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        metrics=f"{RESULTS}/{{rank}}/metrics.parquet",
    log:
        f"{LOGS}/evaluate.{{rank}}.log",
    benchmark:
        f"{BENCH}/evaluate.{{rank}}.tsv"
    threads: 2
    script:
        "../scripts/evaluate.py"
