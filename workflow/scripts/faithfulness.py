# Snakemake adapter: insertion and deletion of every method, and the counterfactual traits, at one rank.
from taxotrait import evaluation
from taxotrait.runner import run_script


def steps(s):
    evaluation.faithfulness_step(s.wildcards.rank, s.input, s.output, s.config)
    evaluation.counterfactual_step(s.wildcards.rank, s.input, s.output, s.config)


run_script(snakemake, steps)
