# Snakemake adapter: the coarse-to-fine figure of every species.
from taxotrait.runner import run_step
from taxotrait.steps.figures import hierarchy_figures

run_step(snakemake, lambda s, settings: hierarchy_figures(s.input, s.output, settings, workers=s.threads))
