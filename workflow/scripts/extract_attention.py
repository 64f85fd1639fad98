# Snakemake adapter: attention maps to HDF5.
from taxotrait import workflow
from taxotrait.runner import run_script

run_script(snakemake, lambda s: workflow.extract_rank_attention(s.wildcards.rank, s.input, s.output, s.config))
