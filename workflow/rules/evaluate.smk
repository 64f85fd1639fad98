# Accuracy overall and per class on every split: flat, among siblings, and top-down. One job for every rank: each
# batch of images is scored once per rank, and its prediction serves the finer ranks' top-down prediction; only
# per-class counts are kept, so the memory is one batch's scores whatever the number of images and classes.
rule evaluate:
    input:
        models=expand(f"{RESULTS}/{{rank}}/model.pt", rank=RANKS),
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        metrics=expand(f"{RESULTS}/{{rank}}/metrics.parquet", rank=RANKS),
    params:
        settings=settings("ranks", "backbone", "model.class_chunk", "train.device"),
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["gpu"],
    script:
        "../scripts/evaluate.py"
