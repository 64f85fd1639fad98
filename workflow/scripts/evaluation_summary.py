# Snakemake adapter: the dataset's faithfulness and localization tables, figures and evaluation.md.
from taxotrait.runner import run_step
from taxotrait.steps.evaluation import evaluation_summary

run_step(snakemake, lambda s, settings: evaluation_summary(s.input, s.output, settings))
