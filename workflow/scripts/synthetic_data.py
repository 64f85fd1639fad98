# Snakemake adapter: the embedded demo dataset.
from taxotrait.runner import run_step
from taxotrait.steps.data import synthetic_data

run_step(snakemake, lambda s, settings: synthetic_data(s.output, settings, workers=s.threads))
