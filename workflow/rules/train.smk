# Prompt-CAM per rank. A resumable state is kept beside the model (train_state.pt) so an interrupted run resumes.
def train_params(wildcards):
    """What a rank's training depends on: backbone, model, contrast and the rank's train settings (its rank_overrides applied),
    so that changing one rank's override re-trains that rank only. Not the number of data-parallel processes."""
    settings = {**config["train"], **(config.get("rank_overrides") or {}).get(wildcards.rank, {})}
    settings.pop("processes", None)
    return json.dumps({"backbone": config["backbone"], "model": config["model"], "train": settings,
                       "contrast": config["contrast"]}, sort_keys=True)


rule train:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        train_tokens=f"{RESULTS}/cache/train.tokens.npy",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        model=f"{RESULTS}/{{rank}}/model.pt",
        log_table=f"{RESULTS}/{{rank}}/train_log.parquet",
    params:
        settings=train_params,
    log:
        f"{LOGS}/train.{{rank}}.log",
    benchmark:
        f"{BENCH}/train.{{rank}}.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["gpu"],
    script:
        "../scripts/train.py"
