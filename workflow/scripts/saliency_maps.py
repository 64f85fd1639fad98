# Snakemake adapter: every method's saliency maps on the evaluation subset of one rank.
from taxotrait import evaluation
from taxotrait.runner import run_step

run_step(snakemake, lambda s, settings: evaluation.saliency_maps(s.wildcards.rank, s.input, s.output, settings))
