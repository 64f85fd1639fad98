# Snakemake adapter: greedy head masking of one rank.
from taxotrait.runner import run_step
from taxotrait.steps.masking import mask_heads

run_step(snakemake, lambda s, settings: mask_heads(s.wildcards.rank, s.input, s.output, settings))
