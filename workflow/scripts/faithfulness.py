# Snakemake adapter: insertion and deletion of every method, and the counterfactual traits, at one rank.
from taxotrait.runner import run_step
from taxotrait.steps.evaluation import faithfulness

run_step(snakemake, lambda s, settings: faithfulness(s.wildcards.rank, s.input, s.output, settings))
