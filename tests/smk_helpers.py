"""Run the workflow from tests: snakemake on this repo's Snakefile in a scratch directory, with the test
interpreter's environment on PATH so that rules' `python -m workflow_scripts...` find the same packages."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def smk_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def smk(workdir, *args, check=True, timeout=1800):
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
                          env=smk_env(), timeout=timeout)
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


def smk_killed_when(workdir, marker: Path, *args, timeout: float = 300) -> None:
    """Run snakemake (one core) and SIGTERM its whole process group as soon as `marker` exists: a workflow killed
    in the middle, as a cluster's time limit or a user's Ctrl-C would."""
    proc = subprocess.Popen([*SNAKEMAKE, "--directory", str(workdir), "--cores", "1", *args], env=smk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not Path(marker).exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
