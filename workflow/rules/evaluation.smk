# Evaluation of the explanations (config `evaluation`, taxotrait.evaluation): faithfulness (insertion, deletion)
# against Grad-CAM, Layer-CAM, Finer-CAM, Eigen-CAM and attention rollout on a linear probe, localization against the
# ground truth (masks or CUB-style part keypoints) and, on the demo, counterfactual traits; every score with its
# interval.
from taxotrait import report as reporting


rule train_probes:
    input:
        unpack(train_tokens),
        manifest=f"{RESULTS}/manifest.parquet",
        classes=f"{RESULTS}/classes.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        probes=expand(f"{RESULTS}/{{rank}}/probe.pt", rank=RANKS),
    log:
        f"{LOGS}/train_probes.log",
    benchmark:
        f"{BENCH}/train_probes.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["gpu"],
    params:
        settings=settings(
            "ranks",
            "backbone",
            "model",
            "contrast",
            "cache",
            "augment.resize",
            IMAGE_LIMIT,
            "evaluation.device",
            "evaluation.batch_size",
        ),
    script:
        "../scripts/train_probes.py"


rule saliency_maps:
    input:
        model=trained_model,
        probe=f"{RESULTS}/{{rank}}/probe.pt",
        attention=f"{RESULTS}/{{rank}}/attention.h5",
        heads=f"{RESULTS}/{{rank}}/heads.parquet",
        manifest=f"{RESULTS}/manifest.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        saliency=f"{RESULTS}/{{rank}}/saliency.h5",
    log:
        f"{LOGS}/saliency_maps.{{rank}}.log",
    benchmark:
        f"{BENCH}/saliency_maps.{{rank}}.tsv"
    threads: 1
    resources:
        gpu=config["resources"]["gpu"],
    params:
        settings=settings(
            "ranks",
            "backbone",
            "augment.resize",
            "attention.split",
            "evaluation.images",
            "evaluation.device",
            "evaluation.batch_size",
            IMAGE_LIMIT,
        ),
    script:
        "../scripts/saliency_maps.py"


# insertion/deletion and, on the demo, counterfactual traits: whether each model uses what its maps show (one job,
# one model load per rank)
rule faithfulness:
    input:
        model=trained_model,
        probe=f"{RESULTS}/{{rank}}/probe.pt",
        saliency=f"{RESULTS}/{{rank}}/saliency.h5",
        heads=f"{RESULTS}/{{rank}}/heads.parquet",
        manifest=f"{RESULTS}/manifest.parquet",
        eval_tokens=f"{RESULTS}/cache/eval.tokens.npy",
        weights=backbone_weights(),
    output:
        table=f"{RESULTS}/{{rank}}/faithfulness.parquet",
        curves=f"{RESULTS}/{{rank}}/faithfulness_curves.parquet",
        counterfactual=f"{RESULTS}/{{rank}}/counterfactual.parquet",
    log:
        f"{LOGS}/faithfulness.{{rank}}.log",
    benchmark:
        f"{BENCH}/faithfulness.{{rank}}.tsv"
    threads: faithfulness_threads
    resources:
        gpu=config["resources"]["gpu"],
    params:
        settings=settings(
            "ranks",
            "backbone",
            "model.class_chunk",
            "augment.resize",
            "data.synthetic",
            "evaluation.faithfulness",
            "evaluation.localization",
            "evaluation.device",
            "evaluation.batch_size",
            IMAGE_LIMIT,
        ),
    script:
        "../scripts/faithfulness.py"


rule localization:
    input:
        unpack(part_annotation_inputs),
        saliency=f"{RESULTS}/{{rank}}/saliency.h5",
        attention=f"{RESULTS}/{{rank}}/attention.h5",
        heads=f"{RESULTS}/{{rank}}/heads.parquet",
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        table=f"{RESULTS}/{{rank}}/localization.parquet",
        head_parts=f"{RESULTS}/{{rank}}/head_parts.parquet",
    log:
        f"{LOGS}/localization.{{rank}}.log",
    benchmark:
        f"{BENCH}/localization.{{rank}}.tsv"
    params:
        settings=settings(
            "backbone.img_size",
            "augment.resize",
            "attention.split",
            "evaluation.localization",
            "evaluation.parts",
            IMAGE_LIMIT,
        ),
    script:
        "../scripts/localization.py"


rule evaluation_summary:
    input:
        faithfulness=expand(f"{RESULTS}/{{rank}}/faithfulness.parquet", rank=RANKS),
        curves=expand(f"{RESULTS}/{{rank}}/faithfulness_curves.parquet", rank=RANKS),
        localization=expand(f"{RESULTS}/{{rank}}/localization.parquet", rank=RANKS),
        counterfactual=expand(f"{RESULTS}/{{rank}}/counterfactual.parquet", rank=RANKS),
        saliency=expand(f"{RESULTS}/{{rank}}/saliency.h5", rank=RANKS),
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        faithfulness=f"{RESULTS}/faithfulness.parquet",
        localization=f"{RESULTS}/localization.parquet",
        counterfactual=f"{RESULTS}/counterfactual.parquet",
        figures=report(
            directory(f"{RESULTS}/figures/evaluation"),
            patterns=["{name}.png"],
            caption="../report/evaluation.rst",
            category=reporting.category("Evaluation"),
            labels=lambda wildcards, output: reporting.figure_labels(output.figures, wildcards.name),
        ),
        summary=f"{RESULTS}/evaluation.md",
        html=report(
            f"{RESULTS}/evaluation.html",
            caption="../report/evaluation_summary.rst",
            category=reporting.category("Evaluation"),
            labels=reporting.labels(kind="evaluation tables"),
        ),
    log:
        f"{LOGS}/evaluation_summary.log",
    benchmark:
        f"{BENCH}/evaluation_summary.tsv"
    params:
        settings=settings(*reporting.EVALUATION_SETTINGS, "augment.resize", IMAGE_LIMIT),  # shown in evaluation.html
    script:
        "../scripts/evaluation_summary.py"
