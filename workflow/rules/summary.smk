# Accuracy and, where ground-truth masks exist, the pointing game of the trait heads; the demo's targets.
rule summary:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
        metrics=expand(f"{RESULTS}/{{rank}}/metrics.parquet", rank=RANKS),
        heads=expand(f"{RESULTS}/{{rank}}/heads.parquet", rank=RANKS),
        attention=expand(f"{RESULTS}/{{rank}}/attention.h5", rank=RANKS),
    output:
        summary=report(f"{RESULTS}/summary.md", caption="../report/summary.rst", category="Summary"),
        pointing=f"{RESULTS}/pointing_game.parquet",
    log:
        f"{LOGS}/summary.log",
    benchmark:
        f"{BENCH}/summary.tsv"
    script:
        "../scripts/summary.py"
