# Prompt-CAM per rank. A resumable state is kept beside the model (train_state.pt) so an interrupted run resumes.
rule train:
    input:
        unpack(train_tokens),
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        model=f"{RESULTS}/{{rank}}/model.pt",
        log_table=f"{RESULTS}/{{rank}}/train_log.parquet",
    log:
        f"{LOGS}/train.{{rank}}.log",
    benchmark:
        f"{BENCH}/train.{{rank}}.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["gpu"],
        processes=train_processes,
    params:
        settings=train_settings,
    script:
        "../scripts/train.py"
