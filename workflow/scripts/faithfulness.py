# Snakemake adapter: insertion and deletion of every method, and the counterfactual traits, at one rank.
from taxotrait import evaluation
from taxotrait.runner import run_step


def steps(s, settings):
    evaluation.faithfulness_step(s.wildcards.rank, s.input, s.output, settings)
    evaluation.counterfactual_step(s.wildcards.rank, s.input, s.output, settings)


run_step(snakemake, steps)
