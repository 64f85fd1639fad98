# Snakemake adapter: every method's saliency maps on the evaluation subset of one rank.
from taxotrait.runner import run_step
from taxotrait.steps.evaluation import saliency_maps

run_step(snakemake, lambda s, settings: saliency_maps(s.wildcards.rank, s.input, s.output, settings))
