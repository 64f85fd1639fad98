# Snakemake adapter: the token cache of the training (augmented views) or the eval images.
from taxotrait.runner import run_step
from taxotrait.steps.cache import cache_tokens

run_step(snakemake, lambda s, settings: cache_tokens(s.wildcards.kind, s.input.manifest, s.output.tokens, settings,
                                                     s.threads))
