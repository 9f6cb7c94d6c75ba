"""A real one-node SLURM for the tests: Debian's munge, slurmctld and slurmd, started as
this user's processes with a configuration of their own under a temporary folder (no
system service, nothing in /etc), on 127.0.0.1, with this machine's cores and memory.

``make test`` installs the packages where apt is available (``make slurm``); without them,
or without root (slurmd must start jobs as their users), the SLURM tests are skipped with a
reason. Stopped by PID after every job is cancelled and its processes are gone.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port, stop

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")


def missing() -> str | None:
    """Why a SLURM cannot start here, or None when it can."""
    absent = [p for p in DAEMONS + CLIENTS if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if absent:
        return f"no {', '.join(absent)} (make test installs Debian's munge, slurmctld, slurmd and slurm-client where apt is)"
    if os.geteuid() != 0:
        return "slurmd starts jobs as their users and needs root here"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Slurm:
    """One node (this machine, as ``hostname -s``), one partition ``debug``, cons_tres
    scheduling of cores and memory, no accounting, no cgroups (proctrack/linuxproc)."""

    home: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.home / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a client of this SLURM needs in its environment (sbatch, squeue, dask-jobqueue)."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        node = socket.gethostname().split(".")[0]
        cores = os.cpu_count() or 1
        memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        for sub in ("state", "spool", "log"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        key = self.home / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        h = self.home
        self.conf.write_text("\n".join([
            "ClusterName=overtile-test",
            f"SlurmctldHost={node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={h}/munge.sock", "CredType=cred/munge",
            f"StateSaveLocation={h}/state", f"SlurmdSpoolDir={h}/spool",
            f"SlurmctldPidFile={h}/slurmctld.pid", f"SlurmdPidFile={h}/slurmd.pid",
            f"SlurmctldLogFile={h}/log/slurmctld.log", f"SlurmdLogFile={h}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30", "KillWait=5", "MinJobAge=2",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cores} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        env = {**os.environ, **self.env}
        self.processes["munged"] = subprocess.Popen(
            [_binary("munged"), "--foreground", "--force", f"--socket={h}/munge.sock", f"--key-file={key}",
             f"--pid-file={h}/munged.pid", f"--log-file={h}/log/munged.log", f"--seed-file={h}/munge.seed"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(lambda: (h / "munge.sock").exists(), timeout, "munged")
        self.processes["slurmctld"] = subprocess.Popen([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=env,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                                       start_new_session=True)
        self.processes["slurmd"] = subprocess.Popen([_binary("slurmd"), "-D", "-f", str(self.conf)], env=env,
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                                    start_new_session=True)
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False), timeout, "the node")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}): {self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} not ready within {timeout} s: {self.logs()}")

    def run(self, *args: str, check: bool = True) -> str:
        """A SLURM client command against this SLURM; its output."""
        result = subprocess.run([_binary(args[0]), *args[1:]], env={**os.environ, **self.env}, capture_output=True,
                                text=True, timeout=60)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def jobs(self) -> list[dict[str, str]]:
        """The jobs in the queue: id, name, state."""
        lines = self.run("squeue", "-h", "-o", "%i|%j|%T").split()
        return [dict(zip(("id", "name", "state"), line.split("|"))) for line in lines]

    def logs(self) -> str:
        return " | ".join(f"{p.name}: {p.read_text()[-800:]}" for p in sorted((self.home / "log").glob("*.log")))

    def stop(self) -> None:
        """Cancel every job and wait until the node holds none of their processes, then stop
        the daemons by PID (slurmd, slurmctld, munged)."""
        if "slurmd" in self.processes and self.processes["slurmd"].poll() is None:
            self.run("scancel", "--full", "--partition", "debug", check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (self.jobs() or self.run("scontrol", "listpids", check=False)
                                                   .strip().count("\n") > 0):
                time.sleep(0.3)
        for name in reversed(DAEMONS):
            if name in self.processes:
                stop(self.processes.pop(name))
