# Snakemake adapter: the dataset's faithfulness and localization tables, figures and evaluation.md.
from taxotrait import evaluation
from taxotrait.runner import run_script

run_script(snakemake, lambda s: evaluation.evaluation_summary(s.input, s.output, s.config))
