# Snakemake adapter: coarse-to-fine trait heads of every species.
from taxotrait.figures import hierarchy_figures
from taxotrait.runner import run_script

run_script(snakemake, lambda s: hierarchy_figures(dict(zip(s.config["ranks"], s.input.attention)), s.input.hierarchy,
                                                  s.input.manifest, s.output.figures, s.config))
