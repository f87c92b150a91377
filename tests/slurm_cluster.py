"""A real single-node Slurm (slurmctld + slurmd + munged from Debian's packages) under one
temporary directory, for the tests of Slurm stages (recipe: spec/slurm.md). Started once per
test session and stopped whole: jobs cancelled, daemons ended by pid, cgroups removed.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    for tool in ("slurmctld", "slurmd", "munged", "mungekey") + CLIENTS:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return (f"{tool} is not installed (apt-get install slurmctld slurmd slurm-client "
                    "munge; .ci/run does)")
    if os.geteuid() != 0:
        return "a test Slurm needs root (slurmd runs jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


class Cluster:
    def __init__(self, root: str) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(root, "slurm.conf")
        self.jobcomp = os.path.join(root, "log", "jobcomp.txt")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.pids: list[int] = []

    def start(self) -> Cluster:
        r = self.root
        os.chmod(r, 0o711)  # munged refuses a socket below a 0700 directory ("inaccessible")
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(r, sub), exist_ok=True)
        os.chmod(os.path.join(r, "munge"), 0o711)
        key = os.path.join(r, "munge", "munge.key")
        subprocess.run([_tool("mungekey"), "-c", "-k", key], check=True, capture_output=True)
        done = subprocess.run([_tool("munged"), f"--socket={r}/munge/sock", f"--key-file={key}",
                               f"--pid-file={r}/munge/pid", f"--log-file={r}/munged.log",
                               f"--seed-file={r}/munge/seed"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"munged failed: {done.stderr.strip()}")
        with open(self.conf, "w") as fh:
            fh.write(f"""ClusterName=t1
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={r}/munge/sock
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        with open(os.path.join(r, "cgroup.conf"), "w") as fh:
            fh.write("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
        subprocess.run([_tool("slurmctld"), "-f", self.conf, "-i"], check=True, env=self.env,
                       capture_output=True)
        subprocess.run([_tool("slurmd"), "-f", self.conf], check=True, env=self.env,
                       capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True,
                                 text=True, check=False).stdout.split()
            if "idle" in out:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"slurm did not come up; see {r}/log")

    def run(self, *argv: str) -> str:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, check=False).stdout

    def queue(self) -> list[str]:
        """Job ids slurmctld still has pending or running."""
        return self.run("squeue", "-h", "-o", "%i").split()

    def submissions(self, name_part: str) -> int:
        """How many jobs whose name contains name_part were ever submitted (scontrol keeps them
        MinJobAge after they ended)."""
        out = self.run("scontrol", "show", "job", "-o")
        return sum(1 for line in out.splitlines() if "JobName=heidi-" in line and name_part in line)

    def stop(self) -> None:
        r = self.root
        ids = self.queue() if os.path.exists(os.path.join(r, "slurmctld.pid")) else []
        if ids:
            subprocess.run(["scancel", *ids], env=self.env, capture_output=True, check=False)
            deadline = time.monotonic() + 30
            while self.queue() and time.monotonic() < deadline:
                time.sleep(0.2)
        pids = []
        for name in ("slurmctld.pid", "slurmd.pid", "munge/pid"):
            try:
                with open(os.path.join(r, name)) as fh:
                    pids.append(int(fh.read().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        if os.path.exists(os.path.join(r, "slurmctld.pid")):
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=60, check=False)
        for pid in pids:
            deadline = time.monotonic() + 10
            if pid == pids[-1]:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for controller in os.listdir("/sys/fs/cgroup") if os.path.isdir("/sys/fs/cgroup") else ():
            top = os.path.join("/sys/fs/cgroup", controller, f"slurm_{self.node}")
            if os.path.isdir(top):
                for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass
