# Snakemake adapter: train one rank (several GPUs for the job, its `gpu` resource, or train.processes, its
# `processes` resource: data-parallel training, one process each).
from taxotrait.runner import run_step
from taxotrait.steps.train import train

run_step(snakemake, lambda s, settings: train(s.wildcards.rank, s.input, s.output, settings,
                                              processes=int(s.resources.get("processes", 0)),
                                              gpus=int(s.resources.get("gpu", 0)), log_file=s.log[0],
                                              threads=s.threads))
