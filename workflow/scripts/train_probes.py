# Snakemake adapter: linear probes (the CAM baselines' classifier) of every rank.
from taxotrait import evaluation
from taxotrait.runner import run_step

run_step(snakemake, lambda s, settings: evaluation.train_probes(s.input, s.output, settings))
