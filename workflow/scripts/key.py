# Snakemake adapter: the key (key.parquet, key.md, key.html).
from taxotrait.runner import run_step
from taxotrait.steps.key import key

run_step(snakemake, lambda s, settings: key(s.input, s.output, settings))
