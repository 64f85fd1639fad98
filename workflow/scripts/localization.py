# Snakemake adapter: pointing games and part consistency of every method at one rank.
from taxotrait import evaluation
from taxotrait.runner import run_script

run_script(snakemake, lambda s: evaluation.localization_step(s.wildcards.rank, s.input, s.output, s.config))
