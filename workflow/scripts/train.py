# Snakemake adapter: train one rank.
from taxotrait import workflow
from taxotrait.runner import run_script

# several GPUs for the job (its `gpu` resource): data-parallel training, one process per GPU
run_script(snakemake, lambda s: workflow.train_rank(s.wildcards.rank, s.input, s.output, s.config,
                                                    gpus=int(s.resources.get("gpu", 0)), log_file=s.log[0]))
