# Snakemake adapter: the coarse-to-fine trait table.
from taxotrait.runner import run_script
from taxotrait.traits import write_hierarchy

run_script(snakemake, lambda s: write_hierarchy(s.input.heads, s.input.manifest, s.config["ranks"], s.output.hierarchy,
                                                s.config))
