"""Cluster path: dry runs of the SLURM profile, and the tiny experiment set on a real single-node SLURM cluster."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import slurm_cluster
import yaml
import yte

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
SLURM_PROFILE = REPO / "profiles" / "slurm"
# Rules that must get GPUs; the plan checks are by resources (a job with `gpu` goes to the GPU partition), so a new
# GPU rule needs no edit here.
GPU_RULES = {"train", "align", "generate", "generate_sets", "judge"}
PLUGIN_MISSING = ("snakemake-executor-plugin-slurm is not importable by this Python: "
                  "pip install snakemake-executor-plugin-slurm==2.8.0 (see requirements.lock)")
OVERRIDES = ("SAFEFT_CPU_PARTITION", "SAFEFT_GPU_PARTITION", "SAFEFT_GPU_MODEL", "SAFEFT_SLURM_ACCOUNT")


def require_plugin():
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail(PLUGIN_MISSING)


def smk_env(**extra):
    # Rules call `python -m workflow_scripts...`: that must be this interpreter, on the jobs' PATH too
    # (sbatch --export=ALL hands this environment to every job).
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    env.update(PYTHONPATH=str(REPO), PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    env.update(extra)
    return env


def smk(workdir, *args, env=None, timeout=600, snakefile=True):
    cmd = [sys.executable, "-m", "snakemake", *(["-s", str(REPO / "Snakefile")] if snakefile else []),
           "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or smk_env(), cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_resources(dry_run_stdout: str) -> list[tuple[str, dict]]:
    """(rule, resources) of every job in a dry run's plan."""
    jobs, rule = [], None
    for line in dry_run_stdout.splitlines():
        if m := re.match(r"(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif (m := re.match(r"\s+resources: (.+)", line)) and rule:
            jobs.append((rule, dict(kv.split("=", 1) for kv in m.group(1).split(", "))))
            rule = None
    return jobs


def assert_gpu_plan(jobs, gpu_partition="a100", cpu_partition="cpu", gpu_model="a100"):
    assert jobs
    for rule, res in jobs:
        if "gpu" in res:
            assert res["slurm_partition"] == gpu_partition and int(res["gpu"]) >= 1, (rule, res)
            assert res.get("gpu_model") == gpu_model, (rule, res)
        else:
            assert res["slurm_partition"] == cpu_partition, (rule, res)
            assert rule.rstrip("0123456789") not in GPU_RULES, (rule, res)


@pytest.mark.parametrize("args", [
    ["results/gsm8k_real6/safe_rate.json", "results/gsm8k_real6/utility.json"],  # the paper's setting
    ["--configfile", str(TINY)],
])
def test_slurm_profile_dry_run_puts_gpu_rules_on_a100(tmp_path, args):
    require_plugin()
    jobs = planned_resources(smk(tmp_path, "-n", "--profile", str(SLURM_PROFILE), *args).stdout)
    assert {"train", "generate"} <= {r for r, _ in jobs}
    assert_gpu_plan(jobs)
    train = next(res for r, res in jobs if r == "train")
    assert train["gpu"] == "4" and train["cpus_per_task"] == "32" and train["mem_mb"] == str(256 * 1024)


def test_partitions_and_account_come_from_the_environment(tmp_path):
    require_plugin()
    env = smk_env(SAFEFT_CPU_PARTITION="short", SAFEFT_GPU_PARTITION="gpu-h100", SAFEFT_GPU_MODEL="",
                  SAFEFT_SLURM_ACCOUNT="lab42")
    out = smk(tmp_path, "-n", "--profile", str(SLURM_PROFILE), "--configfile", str(TINY), env=env).stdout
    jobs = planned_resources(out)
    assert_gpu_plan(jobs, gpu_partition="gpu-h100", cpu_partition="short", gpu_model=None)
    assert all(res["slurm_account"] == "lab42" for _, res in jobs)


def test_profile_by_name_from_the_repo_root(tmp_path):
    """The documented one-line setup makes the user's literal `snakemake --profile slurm` work."""
    require_plugin()
    xdg = tmp_path / "xdg"
    (xdg / "snakemake").mkdir(parents=True)
    (xdg / "snakemake" / "slurm").symlink_to(SLURM_PROFILE)  # = ln -s $PWD/profiles/slurm ~/.config/snakemake/
    proc = smk(tmp_path / "work", "-n", "--profile", "slurm", "results/gsm8k_real6/safe_rate.json",
               env=smk_env(XDG_CONFIG_HOME=str(xdg)), snakefile=False)
    assert "workflow specific profile profiles/default" in proc.stderr
    assert_gpu_plan(planned_resources(proc.stdout))


def test_local_and_ci_profiles(tmp_path):
    proc = smk(tmp_path, "-n", "--configfile", str(TINY))
    assert "workflow specific profile profiles/default" in proc.stderr
    out = smk(tmp_path, "-n", "--profile", str(REPO / "profiles" / "ci"), "--configfile", str(TINY)).stdout
    assert "Job stats" in out and "slurm_partition" not in out


# --- a real cluster ---------------------------------------------------------------------------------------------

def tiny_profile(dest: Path) -> Path:
    """The SLURM profile as Snakemake renders it, with resources shrunk to fit one 2-CPU node with 2 GPUs.

    It goes after profiles/slurm on the command line, so only the keys it sets (resources, status polling) change.
    """
    with open(SLURM_PROFILE / "config.yaml") as f:
        prof = yte.process_yaml(f, require_use_yte=True)
    small = {"cpus_per_task": 1, "mem_mb": 256, "runtime": 15}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump({
        "default-resources": {**prof["default-resources"], **small},
        # Classes shrink, threads follow their cpus_per_task (1).
        "config": {"job_classes": {name: {**res, **small, "gpu": min(res["gpu"], 2)}
                                   for name, res in prof["config"]["job_classes"].items()}},
        # No accounting database here: poll squeue (MinJobAge keeps finished jobs listed), and poll early.
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 2,
        "latency-wait": 5,
    }))
    return dest


def run_bounded(cmd, env, timeout):
    """Run Snakemake to completion or kill its process group: it ignores SIGTERM while waiting on SLURM."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
        raise AssertionError(f"snakemake on SLURM timed out after {timeout}s:\n{out[-6000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"snakemake on SLURM failed ({proc.returncode}):\n{out[-6000:]}")
    return out


def slurm_jobs() -> dict[str, dict]:
    """Every job slurmctld still knows (finished ones stay for MinJobAge), by job id."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def rule_of(job: dict) -> str:
    # The executor plugin tags each job with --comment rule_<rule>[_wildcards_<values>].
    return re.match(r"rule_(\w+?)(?:_wildcards_|$)", job["Comment"]).group(1)


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    require_plugin()
    try:
        slurm_cluster.ensure_packages()
    except slurm_cluster.Unavailable as e:
        pytest.skip(f"no SLURM cluster for this test: {e}")
    base = tmp_path_factory.mktemp("slurm")
    try:
        cluster = slurm_cluster.start(base / "state")
    except slurm_cluster.Unavailable as e:
        pytest.skip(f"no SLURM cluster for this test: {e}")
    work = base / "work"
    work.mkdir()
    # The tiny set without the experiments that add nothing SLURM-specific (time on 2 cores matters in CI): the
    # base, a plain fine-tune with its judges (GPU rules) and the two-seed preview experiment remain.
    cfg = yaml.safe_load(TINY.read_text())
    for name in ("tiny_virtual", "tiny_realign"):
        del cfg["experiments"][name]
    cfg["report"]["experiments"] = ["tiny_base", "tiny_vanilla", "tiny_real6"]
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    overlay = tiny_profile(base / "tiny_profile")
    env = smk_env(SAFEFT_CPU_PARTITION="cpu", SAFEFT_GPU_PARTITION="a100")

    def run(configfile):
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
               "--profile", str(SLURM_PROFILE), "--profile", str(overlay), "--configfile", str(configfile)]
        plan = subprocess.run([*cmd, "-n"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
        before = set(slurm_jobs())
        t0 = time.monotonic()
        out = run_bounded(cmd, env, timeout=900)
        jobs = {k: v for k, v in slurm_jobs().items() if k not in before}
        return {"out": out, "jobs": jobs, "seconds": time.monotonic() - t0, "plan": submitted_plan(plan.stdout)}

    try:
        yield {"work": work, "run": run, "first": run(work / "tiny.yaml"), "overlay": overlay}
    finally:
        cluster.stop()


def submitted_plan(dry_run_stdout: str) -> Counter:
    """Jobs a dry run plans to submit, as the plugin's job comments (local rules such as `all` stay local)."""
    plan, job = Counter(), None
    for line in [*dry_run_stdout.splitlines(), "localrule end_of_plan:"]:
        if m := re.match(r"(local)?rule (\w+):", line):
            if job:
                plan[job] += 1
            job = None if m.group(1) else f"rule_{m.group(2)}"
        elif (m := re.match(r"\s+wildcards: (.+)", line)) and job:
            job += "_wildcards_" + "_".join(kv.split("=", 1)[1] for kv in m.group(1).split(", "))
    # `all` only gathers its inputs: Snakemake completes it itself once they exist, with no job to submit.
    return Counter({j: n for j, n in plan.items() if j != "rule_all"})


@pytest.mark.slow
def test_tiny_experiments_on_slurm(slurm_run):
    work, first = slurm_run["work"], slurm_run["first"]
    summary = (work / "results/report/summary.md").read_text()
    assert all(exp in summary for exp in ("tiny_base", "tiny_vanilla", "tiny_real6"))
    r = json.loads((work / "results/tiny_real6/safe_rate.json").read_text())
    assert r["n_seeds"] == 2 and 0.0 <= r["value"] <= 1.0
    # The jobs ran this interpreter (the system python has no torch): sbatch exported our PATH.
    assert json.loads((work / "results/tiny_real6/manifest.json").read_text())["packages"]["torch"]
    jobs = list(first["jobs"].values())
    # SLURM received exactly the jobs the dry run planned, each once.
    assert Counter(j["Comment"] for j in jobs) == first["plan"]
    rules = {rule_of(j) for j in jobs}
    assert {"align", "train", "generate", "preview", "score", "judge", "report"} <= rules
    for job in jobs:
        assert job["JobState"] == "COMPLETED" and job["NodeList"] == slurm_cluster.short_hostname(), job
        if "gpu" in job.get("TresPerJob", ""):
            assert job["Partition"] == "a100" and re.fullmatch(r"gres:gpu:a100:[12]", job["TresPerJob"]), job
        else:
            assert job["Partition"] == "cpu" and rule_of(job).rstrip("0123456789") not in GPU_RULES, job
    print(f"tiny set on SLURM: {len(jobs)} jobs in {first['seconds']:.0f} s")


@pytest.mark.slow
def test_changing_one_preview_parameter_resubmits_only_that_experiment(slurm_run):
    work = slurm_run["work"]
    cfg = yaml.safe_load((work / "tiny.yaml").read_text())
    cfg["experiments"]["tiny_real6"]["methods"][0]["m"] = 3
    (work / "changed.yaml").write_text(yaml.safe_dump(cfg))
    second = slurm_run["run"](work / "changed.yaml")
    seen = Counter(j["Comment"] for j in second["jobs"].values())
    assert seen == second["plan"], second["out"][-3000:]
    rules = Counter(rule_of({"Comment": c}) for c in seen.elements())
    # Only tiny_real6's chain (preview -> training data -> both seeds' training, generation, scores) and the
    # report that collects every experiment; nothing of the shared aligned model or the other experiments.
    assert all("tiny_real6" in c or rule_of({"Comment": c}) == "report" for c in seen), seen
    assert rules["preview"] == 1 and rules["train"] == 2 and rules["generate"] == 4 and rules["report"] == 1
    assert all(j["JobState"] == "COMPLETED" for j in second["jobs"].values())
    print(f"rerun on SLURM: {sum(seen.values())} jobs in {second['seconds']:.0f} s")
