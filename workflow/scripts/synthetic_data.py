# Snakemake adapter: the synthetic demo dataset.
from pathlib import Path

from taxotrait.runner import run_script
from taxotrait.synthetic import generate_dataset

run_script(snakemake, lambda s: generate_dataset(Path(s.output.manifest).parent, **s.config["data"]["synthetic"], workers=s.threads))
