# Snakemake adapter: insertion and deletion of every method at one rank.
from taxotrait import evaluation
from taxotrait.runner import run_script

run_script(snakemake, lambda s: evaluation.faithfulness_step(s.wildcards.rank, s.input, s.output, s.config))
