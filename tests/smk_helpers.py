"""Run the workflow from tests: snakemake on this repo's Snakefile in a scratch directory, with the test
interpreter's environment on PATH so that rules' `python -m workflow_scripts...` find the same packages."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def smk(workdir, *args, check=True, timeout=1800):
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_outputs(dry_run_stdout: str) -> list[str]:
    """Output files of every job a dry run would execute."""
    outs = []
    for line in dry_run_stdout.splitlines():
        m = re.match(r"\s+output: (.+)", line)
        if m:
            outs += [o.strip() for o in m.group(1).split(",")]
    return outs
