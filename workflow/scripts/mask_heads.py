# Snakemake adapter: greedy head masking.
from taxotrait import workflow
from taxotrait.runner import run_script

run_script(snakemake, lambda s: workflow.mask_rank_heads(s.wildcards.rank, s.input, s.output, s.config))
