# Snakemake adapter: the key drawn as a tree of trait maps.
from taxotrait.figures import key_figures
from taxotrait.runner import run_script

run_script(snakemake, lambda s: key_figures(s.input.key, s.input.classes, dict(zip(s.config["ranks"], s.input.attention)),
                                            s.input.manifest, s.output.figure, s.config))
