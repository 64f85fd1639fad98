"""`snakemake --lint`: no finding but the documented one (no conda environment or container per rule: the jobs
use the project's .venv, config/README.md)."""
import re
import subprocess
import sys
from pathlib import Path

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
