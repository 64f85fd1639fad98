# Snakemake adapter: pointing games and part consistency of every method at one rank.
from taxotrait.runner import run_step
from taxotrait.steps.evaluation import localization

run_step(snakemake, lambda s, settings: localization(s.wildcards.rank, s.input, s.output, settings))
