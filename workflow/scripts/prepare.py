# Snakemake adapter: validate the dataset and write its tables.
from taxotrait.dataset import prepare_files
from taxotrait.runner import run_script

run_script(snakemake, lambda s: prepare_files(s.input, s.output, s.config))
