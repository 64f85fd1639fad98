# Snakemake adapter: the coarse-to-fine trait table of every species.
from taxotrait.runner import run_step
from taxotrait.steps.traits import hierarchy_traits

run_step(snakemake, lambda s, settings: hierarchy_traits(s.input, s.output, settings))
