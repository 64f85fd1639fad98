# Snakemake adapter: linear probes (the CAM baselines' classifier) of every rank.
from taxotrait import evaluation
from taxotrait.runner import run_script

run_script(snakemake, lambda s: evaluation.train_probes(s.input, s.output, s.config))
