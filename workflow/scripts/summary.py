# Snakemake adapter: accuracy, pointing game and targets (every output written under a temporary name, then renamed).
from taxotrait.io import atomic_outputs
from taxotrait.runner import run_script
from taxotrait.summary import summarise


def summary(s):
    with atomic_outputs(s.output) as outputs:
        summarise(s.input, outputs, s.config)


run_script(snakemake, summary)
