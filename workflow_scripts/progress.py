"""Run snakemake and follow its progress with an estimate of the time left (`make demo` uses this).

    python -m workflow_scripts.progress [snakemake arguments ...]

Snakemake's own lines pass through unchanged; after each "N of M steps done" line comes one more line with the
elapsed time and an estimate of what is left. The estimate weighs each planned job by how long jobs of its rule
took: from the benchmark files of earlier runs (benchmarks/<rule>/), else from this run's finished jobs, and
divides by the parallelism this run has shown so far.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

STEPS = re.compile(r"^(\d+) of (\d+) steps \(\d+%\) done")
RULE = re.compile(r"^(?:local)?rule (\w+?)\d*:")  # rules made in a loop (generate_sets0, ...) count as one
JOBID = re.compile(r"^\s+jobid: (\d+)")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+?)\d*\)")


def fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def history(bench_dir: str | Path = "benchmarks") -> dict[str, float]:
    """Mean job seconds per rule from earlier runs' benchmark files."""
    import csv

    root = Path(bench_dir)
    per_rule: dict[str, list[float]] = {}
    for f in root.rglob("*.tsv") if root.is_dir() else []:
        try:
            with f.open(newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
            seconds = float(rows[0]["s"])
        except (OSError, KeyError, IndexError, ValueError):
            continue
        per_rule.setdefault(f.relative_to(root).parts[0], []).append(seconds)
    return {rule: sum(v) / len(v) for rule, v in per_rule.items() if v}


class Tracker:
    """Parses snakemake's log lines; `estimate()` gives the seconds left, or None before there is a basis."""

    def __init__(self, prior: dict[str, float] | None = None, clock=time.monotonic):
        self.prior = prior or {}
        self.clock = clock
        self.start = clock()
        self.planned: dict[str, int] = {}
        self.finished: dict[str, list[float]] = {}
        self.started: dict[str, float] = {}
        self._in_stats = False
        self._rule: str | None = None

    def feed(self, line: str) -> str | None:
        """Take one line; returns a progress line to print after it, or None."""
        text = line.rstrip("\n")
        if text.startswith("Job stats:"):
            self._in_stats, self.planned = True, {}
            return None
        if self._in_stats:
            parts = text.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
                rule = parts[0].rstrip("0123456789")
                self.planned[rule] = self.planned.get(rule, 0) + int(parts[1])
            elif not text.strip() or parts[:1] == ["total"]:
                self._in_stats = False
            return None
        if m := RULE.match(text):
            self._rule = m.group(1)
        elif (m := JOBID.match(text)) and self._rule:
            self.started[m.group(1)] = self.clock()
            self._rule = None
        elif m := FINISHED.match(text):
            began = self.started.pop(m.group(1), None)
            if began is not None:
                self.finished.setdefault(m.group(2), []).append(self.clock() - began)
        elif m := STEPS.match(text):
            done, total = int(m.group(1)), int(m.group(2))
            elapsed = self.clock() - self.start
            left = self.estimate()
            tail = f", about {fmt(left)} left" if left is not None and done < total else ""
            return f"[progress] {done}/{total} jobs, {fmt(elapsed)} elapsed{tail}"
        return None

    def expected(self, rule: str) -> float | None:
        if rule in self.prior:
            return self.prior[rule]
        if self.finished.get(rule):
            return sum(self.finished[rule]) / len(self.finished[rule])
        seen = [s for v in self.finished.values() for s in v]
        return sum(seen) / len(seen) if seen else None

    def estimate(self) -> float | None:
        work = 0.0
        for rule, count in self.planned.items():
            left = count - len(self.finished.get(rule, []))
            if left <= 0:
                continue
            per_job = self.expected(rule)
            if per_job is None:
                return None
            work += left * per_job
        # Job seconds per wall second so far: > 1 where small jobs ran side by side.
        elapsed = self.clock() - self.start
        busy = sum(s for v in self.finished.values() for s in v)
        parallel = min(max(busy / elapsed, 1.0), 8.0) if elapsed > 0 and busy > 0 else 1.0
        return work / parallel


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    tracker = Tracker(history())
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            note = tracker.feed(line)
            if note:
                print(note, flush=True)
    except KeyboardInterrupt:
        proc.terminate()
    code = proc.wait()
    print(f"[progress] snakemake finished in {fmt(time.monotonic() - tracker.start)} (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
