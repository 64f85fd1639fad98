# Snakemake adapter: validate the images against the taxonomy.
from taxotrait.runner import run_step
from taxotrait.steps.prepare import prepare

run_step(snakemake, lambda s, settings: prepare(s.input, s.output, settings, s.threads))
