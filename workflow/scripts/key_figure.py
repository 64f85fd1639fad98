# Snakemake adapter: the key figure.
from taxotrait.runner import run_step
from taxotrait.steps.key import key_figure

run_step(snakemake, lambda s, settings: key_figure(s.input, s.output, settings, workers=s.threads))
