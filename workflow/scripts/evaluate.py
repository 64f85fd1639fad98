# Snakemake adapter: accuracy tables.
from taxotrait import workflow
from taxotrait.runner import run_script

run_script(snakemake, lambda s: workflow.evaluate(s.wildcards.rank, s.input, s.output, s.config))
