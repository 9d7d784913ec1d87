"""Bring up (and tear down by PID) a real single-node SLURM cluster from Debian's packages for the cluster tests.

One node with 2 CPUs and GRES gpu:a100:2 (placeholder character devices), partitions `cpu` (default) and `a100`,
no accounting database: job states come from squeue, so jobs stay listed for MinJobAge seconds after they end.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
# The client tools and the executor plugin's job steps read /etc/slurm (the plugin drops SLURM_CONF).
ETC = Path("/etc/slurm")
MARKER = "# written by SafeFT tests/slurm_cluster.py"
NVIDIA_MAJOR = 195


class Unavailable(Exception):
    """SLURM cannot be set up on this machine (no root, no apt, a foreign cluster config)."""


def ensure_packages(timeout: int = 600) -> None:
    """Install SLURM and munge with apt-get when their daemons are missing; Unavailable where that cannot work."""
    if all(shutil.which(d, path="/usr/sbin:/usr/bin") for d in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root (apt-get install slurmctld slurmd)")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {proc.stderr[-1000:]}")


def slurm_conf(host: str, state: Path, min_job_age: int) -> str:
    return f"""{MARKER}
ClusterName=safeft
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# Containers have no usable cgroups: track processes by parent PID and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# No accounting: finished jobs must stay in squeue long enough for the executor plugin's status polls.
MinJobAge={min_job_age}
ReturnToService=2
SlurmdTimeout=60
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 Gres=gpu:a100:2 State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=a100 Nodes={host} MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    """A running single-node cluster: its state folder and the daemons' PIDs."""

    state: Path
    host: str
    procs: list = field(default_factory=list)

    def log(self, name: str) -> str:
        path = self.state / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        """Stop the daemons this object started, newest first, by PID; then remove the config we wrote."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()
        for name in ("slurm.conf", "gres.conf"):
            path = ETC / name
            if path.exists() and path.read_text().startswith(MARKER):
                path.unlink()


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _wait(predicate, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in cluster.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) while waiting for {what}:\n"
                                   f"{cluster.log('slurmctld')}\n{cluster.log('slurmd')}")
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}:\n{cluster.log('slurmctld')}\n{cluster.log('slurmd')}")


def _stop_leftovers(conf: str) -> None:
    """Kill the daemons of an earlier test cluster whose run was killed before its teardown, by their PID files."""
    for key in ("SlurmdPidFile", "SlurmctldPidFile"):
        m = re.search(rf"^{key}=(.+)$", conf, re.M)
        pidfile = Path(m.group(1)) if m else None
        pid = pidfile.read_text().strip() if pidfile and pidfile.exists() else ""
        comm = Path(f"/proc/{pid}/comm")
        # Only a daemon that is still that daemon: the PID may have been reused since.
        if pid.isdigit() and comm.exists() and comm.read_text().strip() in ("slurmd", "slurmctld"):
            os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.5)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def start(state: Path, min_job_age: int = 3600) -> Cluster:
    """Write /etc/slurm/{slurm,gres}.conf, start munged, slurmctld and slurmd in the foreground, wait for the node."""
    existing = ETC / "slurm.conf"
    if existing.exists():
        if not existing.read_text().startswith(MARKER):
            raise Unavailable(f"{existing} belongs to another SLURM setup; not overwriting it")
        _stop_leftovers(existing.read_text())
    if _run("pgrep", "-x", "slurmctld").returncode == 0:
        raise Unavailable("a slurmctld is already running on this machine")
    host = short_hostname()
    state.mkdir(parents=True, exist_ok=True)
    for sub in ("ctld", "d", "dev", "munge"):
        (state / sub).mkdir(exist_ok=True)
    # slurmd checks that every GRES File= exists; task/none never opens them, so placeholders will do.
    for i in range(2):
        dev = state / "dev" / f"nvidia{i}"
        if not dev.exists():
            os.mknod(dev, 0o600 | 0o020000, os.makedev(NVIDIA_MAJOR, i))
    ETC.mkdir(parents=True, exist_ok=True)
    (ETC / "slurm.conf").write_text(slurm_conf(host, state, min_job_age))
    (ETC / "gres.conf").write_text(f"{MARKER}\nNodeName={host} Name=gpu Type=a100 File={state}/dev/nvidia[0-1]\n")

    cluster = Cluster(state=state, host=host)
    try:
        # libmunge always talks to the default socket: reuse a munged already answering there, else start one.
        sock = Path("/run/munge/munge.socket.2")
        if not (sock.exists() and _run("munge", "-n").returncode == 0):
            key = Path("/etc/munge/munge.key")
            if not key.exists():
                subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
                shutil.chown(key, "munge", "munge")
            sock.parent.mkdir(parents=True, exist_ok=True)
            shutil.chown(sock.parent, "munge", "munge")
            cluster.procs.append(subprocess.Popen(
                ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground", "--force"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            _wait(lambda: _run("munge", "-n").returncode == 0, 20, "munged", cluster)
        # -i: ignore state left by an earlier run; -D: stay in the foreground so we own the PID.
        cluster.procs.append(subprocess.Popen(["/usr/sbin/slurmctld", "-D", "-i"], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, start_new_session=True))
        _wait(lambda: _run("scontrol", "ping").stdout.count("UP") > 0, 30, "slurmctld", cluster)
        cluster.procs.append(subprocess.Popen(["/usr/sbin/slurmd", "-D"], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, start_new_session=True))
        _wait(lambda: _run("sinfo", "-h", "-N", "-o", "%t").stdout.strip().startswith("idle"), 60,
              "an idle node", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster
