# Snakemake adapter: pointing games and part consistency of every method at one rank.
from taxotrait import evaluation
from taxotrait.runner import run_step

run_step(snakemake, lambda s, settings: evaluation.localization_step(s.wildcards.rank, s.input, s.output, settings))
