# Snakemake adapter: accuracy, pointing game and targets.
from taxotrait.runner import run_script
from taxotrait.summary import summarise

run_script(snakemake, lambda s: summarise(s.input, s.output, s.config))
