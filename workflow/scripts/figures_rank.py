# Snakemake adapter: trait galleries and shared traits of one rank.
from taxotrait.runner import run_step
from taxotrait.steps.figures import figures

run_step(snakemake, lambda s, settings: figures(s.wildcards.rank, s.input, s.output, settings, workers=s.threads))
