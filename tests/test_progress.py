"""The progress wrapper of `make demo`: parses Snakemake's job plan and finished jobs, estimates the time left."""

from workflow_scripts import progress

LOG = """Job stats:
job          count
---------  -------
demo_data        2
train            2
report           1
total            5

localrule demo_data:
    output: a
    jobid: 1
localrule demo_data:
    output: b
    jobid: 2
Finished jobid: 1 (Rule: demo_data)
1 of 5 steps (20%) done
Finished jobid: 2 (Rule: demo_data)
2 of 5 steps (40%) done
rule train:
    jobid: 3
Finished jobid: 3 (Rule: train)
3 of 5 steps (60%) done
"""


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def run(tracker, clock, lines, step=10.0):
    notes = []
    for line in lines.splitlines():
        clock.t += step if line.startswith("Finished") else 0.0
        note = tracker.feed(line)
        if note:
            notes.append(note)
    return notes


def test_plan_durations_and_estimate_from_this_run():
    clock = Clock()
    t = progress.Tracker(clock=clock)
    notes = run(t, clock, LOG)
    assert t.planned == {"demo_data": 2, "train": 2, "report": 1}
    assert t.finished["demo_data"] == [10.0, 20.0] and t.finished["train"] == [10.0]
    assert notes[0].startswith("[progress] 1/5 jobs, 10s elapsed")
    # left: one train (10 s mean) + one report (overall mean 13.3 s); job-seconds per wall second 40/30
    assert abs(t.estimate() - (10.0 + 40 / 3) / (40 / 30)) < 1e-6
    assert "left" in notes[-1]


def test_history_beats_this_run_and_is_read_from_benchmarks(tmp_path):
    (tmp_path / "train/x").mkdir(parents=True)
    (tmp_path / "train/x/a.tsv").write_text("s\th:m:s\n100.0\t0:01:40\n")
    (tmp_path / "train/x/b.tsv").write_text("s\th:m:s\n200.0\t0:03:20\n")
    (tmp_path / "report").mkdir()
    (tmp_path / "report/r.tsv").write_text("garbage\n")
    prior = progress.history(tmp_path)
    assert prior == {"train": 150.0}
    t = progress.Tracker(prior, clock=Clock())
    t.planned = {"train": 2}
    assert t.estimate() == 300.0
    t.planned = {"train": 2, "unknown_rule": 1}
    assert t.estimate() is None  # no basis for that rule yet


def test_fmt():
    assert progress.fmt(5) == "5s" and progress.fmt(125) == "2m05s"


def test_rules_made_in_a_loop_count_as_one():
    clock = Clock()
    t = progress.Tracker(clock=clock)
    run(t, clock, """Job stats:
job               count
--------------  -------
generate_sets0        1
generate_sets1        6
total                 7

rule generate_sets1:
    jobid: 4
Finished jobid: 4 (Rule: generate_sets1)
1 of 7 steps (14%) done
""")
    assert t.planned == {"generate_sets": 7} and t.finished == {"generate_sets": [10.0]}
