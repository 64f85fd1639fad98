# Snakemake adapter: trait table of one rank (named after the ground truth's parts where there is some).
from taxotrait.runner import run_script
from taxotrait.traits import write_rank_traits

run_script(snakemake, lambda s: write_rank_traits(s.input.heads, s.output.traits, s.input.manifest, s.config))
