# Snakemake adapter: trait table of one rank (named after the ground truth's parts where there is some).
from taxotrait.runner import run_step
from taxotrait.steps.traits import traits

run_step(snakemake, lambda s, settings: traits(s.input, s.output, settings))
