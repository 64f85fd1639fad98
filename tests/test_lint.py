"""Snakemake's conventions, as its workflow catalog checks them: `snakemake --lint` finds nothing but the documented
(no conda environment or container per rule: the jobs use the project's .venv, config/README.md), `snakefmt --check`
leaves the Snakefile and every rules file as they are, and `.snakemake-workflow-catalog.yml` gives the usage."""
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED = "Specify a conda environment or container for each rule."


def test_lint_finds_only_the_documented_per_rule_environment():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    text = result.stdout + result.stderr
    linted = re.findall(r"^Lints for (?:rule|snakefile) .*$", text, flags=re.M)
    findings = {line.strip().removeprefix("* ").rstrip(":") for line in text.splitlines()
                if line.startswith("    * ")}
    assert linted, f"snakemake --lint printed no lint section:\n{text[-3000:]}"
    assert findings == {DOCUMENTED}, f"lint findings other than the documented one:\n{text[-3000:]}"


def test_snakefmt_leaves_the_snakefile_and_the_rules_as_they_are():
    """The line length is the project's (pyproject.toml, [tool.snakefmt]); `snakefmt Snakefile workflow/rules`
    formats them."""
    snakefmt = Path(sys.executable).with_name("snakefmt")
    result = subprocess.run([str(snakefmt), "--check", "Snakefile", "workflow/rules"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"snakefmt would reformat:\n{result.stdout}{result.stderr[-3000:]}"
    assert "15 file(s) would be left unchanged" in result.stderr  # the Snakefile and the 14 rules files, all read


def test_the_workflow_catalog_reads_the_usage():
    usage = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert set(usage) == {"mandatory-flags", "software-stack-deployment", "report"} and usage["report"] is True
    assert usage["mandatory-flags"]["flags"] == "--cores 2" and "make install" in usage["mandatory-flags"]["desc"]
    assert set(usage["software-stack-deployment"]) == {"conda", "singularity", "singularity+conda"}
