# Snakemake adapter: the dataset's faithfulness and localization tables, figures and evaluation.md.
from taxotrait import evaluation
from taxotrait.runner import run_step

run_step(snakemake, lambda s, settings: evaluation.evaluation_summary(s.input, s.output, settings))
