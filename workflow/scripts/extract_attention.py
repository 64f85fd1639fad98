# Snakemake adapter: attention maps of one rank.
from taxotrait.runner import run_step
from taxotrait.steps.attention import extract_attention

run_step(snakemake, lambda s, settings: extract_attention(s.wildcards.rank, s.input, s.output, settings, s.threads))
