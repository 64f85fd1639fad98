# Snakemake adapter: linear probes (the CAM baselines' classifier) of every rank.
from taxotrait.runner import run_step
from taxotrait.steps.evaluation import train_probes

run_step(snakemake, lambda s, settings: train_probes(s.input, s.output, settings))
