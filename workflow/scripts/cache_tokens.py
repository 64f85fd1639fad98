# Snakemake adapter: frozen tokens of a split.
from taxotrait import workflow
from taxotrait.runner import run_script

run_script(snakemake, lambda s: workflow.cache_tokens(s.wildcards.kind, s.input.manifest, s.output.tokens, s.config))
