# Snakemake adapter: train one rank.
from taxotrait import workflow
from taxotrait.runner import run_script

run_script(snakemake, lambda s: workflow.train_rank(s.wildcards.rank, s.input, s.output, s.config))
