# Snakemake adapter: accuracy tables of every rank.
from taxotrait.runner import run_step
from taxotrait.steps.evaluate import evaluate

run_step(snakemake, lambda s, settings: evaluate(s.input, s.output, settings))
