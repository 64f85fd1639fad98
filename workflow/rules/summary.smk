# Accuracy and, where ground-truth masks exist, the pointing game of the trait heads and the key's entries on the
# planted traits; the demo's targets.
from taxotrait import report as reporting


rule summary:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
        metrics=expand(f"{RESULTS}/{{rank}}/metrics.parquet", rank=RANKS),
        heads=expand(f"{RESULTS}/{{rank}}/heads.parquet", rank=RANKS),
        attention=expand(f"{RESULTS}/{{rank}}/attention.h5", rank=RANKS),
        key=f"{RESULTS}/key.parquet",
    output:
        summary=f"{RESULTS}/summary.md",
        html=report(
            f"{RESULTS}/summary.html",
            caption="../report/summary.rst",
            category=reporting.category("Summary"),
            labels=reporting.labels(kind="accuracy and targets"),
        ),
        pointing=f"{RESULTS}/pointing_game.parquet",
    log:
        f"{LOGS}/summary.log",
    benchmark:
        f"{BENCH}/summary.tsv"
    params:
        settings=settings(*reporting.SUMMARY_SETTINGS),  # shown in summary.html
    script:
        "../scripts/summary.py"
