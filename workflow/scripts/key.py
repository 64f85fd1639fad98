# Snakemake adapter: key.parquet, key.md and key.html from every rank's trait table.
from taxotrait.runner import run_script
from taxotrait.traits import write_key

run_script(snakemake, lambda s: write_key(s.input.traits, s.input.classes, s.output, s.config))
