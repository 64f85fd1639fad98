# Snakemake adapter: accuracy tables of every rank.
from taxotrait import workflow
from taxotrait.runner import run_script

run_script(snakemake, lambda s: workflow.evaluate(s.input, s.output, s.config))
