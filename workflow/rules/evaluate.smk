# Accuracy overall and per class on every split: among siblings and top-down (every image, against the children of
# its true and of its predicted parent), flat (a stratified sample of metrics.flat_images, against every class). One
# job for every rank: each batch's prediction serves the finer ranks' top-down prediction; only per-class counts are
# kept, so the memory is one batch's scores whatever the number of images and classes.
rule evaluate:
    input:
        models=expand(f"{RESULTS}/{{rank}}/model.pt", rank=RANKS),
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        metrics=expand(f"{RESULTS}/{{rank}}/metrics.parquet", rank=RANKS),
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["gpu"],
    params:
        settings=settings("ranks", "backbone", "model.class_chunk", "metrics.flat_images", "train.device"),
    script:
        "../scripts/evaluate.py"
