# Snakemake adapter: trait galleries and shared traits of one rank.
from taxotrait.figures import rank_figures
from taxotrait.runner import run_script

run_script(snakemake, lambda s: rank_figures(s.wildcards.rank, s.input.attention, s.input.traits, s.input.manifest,
                                             s.output.figures, s.config))
