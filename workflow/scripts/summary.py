# Snakemake adapter: accuracy, pointing game and targets.
from taxotrait.runner import run_step
from taxotrait.steps.summary import summary

run_step(snakemake, lambda s, settings: summary(s.input, s.output, settings))
