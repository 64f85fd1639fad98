# taxotrait: find and localise the visual traits that tell taxa apart, at every rank of a taxonomy, with Prompt-CAM.
# Run: snakemake --cores 2 (config in config/config.yaml, documented in config/README.md).
from snakemake.utils import min_version

min_version("9.0")


# a YAML mistake in it is named with its file and line (Snakemake reads --configfile files itself, before this)
from snakemake.logging import logger
from taxotrait.config import check_yaml
from taxotrait.runner import stopping_at_start

with stopping_at_start(logger.error):
    check_yaml("config/config.yaml")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"  # the landing page of snakemake --report


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/backbone.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/attention.smk"
include: "workflow/rules/masking.smk"
include: "workflow/rules/traits.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/key.smk"
include: "workflow/rules/evaluation.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
