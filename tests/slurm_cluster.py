"""A real one-node Slurm cluster in a scratch folder: munged, slurmctld and slurmd as root.

Debian's `slurm-wlm` and `munge` provide the daemons. Everything the cluster writes (config,
munge key and socket, state, logs) lives under one folder. One thing is system-wide, as on any
Slurm node: /etc/slurm/slurm.conf, a link to the folder's config, because the Slurm executor
clears SLURM_CONF before its in-job `srun`. It is made only where none exists and removed on
stop. Accounting is off (no slurmdbd), so the workflow queries job status with squeue;
MinJobAge keeps finished jobs visible to it. The node declares GPUS (2) stand-in GPUs (GRES gpu):
Slurm schedules, allocates and records them like real ones, while what runs in a job still
computes on the CPUs. Slurm drops GPUs without a device file, so each one's File is a link to
/dev/null in the folder.

    python tests/slurm_cluster.py start /tmp/slurm   # prints the SLURM_CONF line to export
    python tests/slurm_cluster.py stop /tmp/slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
PACKAGES = "slurm-wlm munge"
GPUS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, "mungekey", "sbatch", "squeue", "scontrol") if shutil.which(name) is None]


def node_line(hostname: str) -> str:
    """NodeName line for this machine, from slurmd -C, with memory kept below what is there."""
    probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in probe.split()[:8] if "=" in item)
    memory = int(int(fields.get("RealMemory", "4096")) * 0.9)
    cpus = fields.get("CPUs", os.cpu_count())
    return f"NodeName={hostname} CPUs={cpus} RealMemory={memory} Gres=gpu:{GPUS} State=UNKNOWN"


def gres_conf(folder: Path, hostname: str) -> str:
    """The node's stand-in GPUs (no detection by NVML): one line per device file."""
    lines = [f"NodeName={hostname} Name=gpu File={folder / f'gpu{index}'}" for index in range(GPUS)]
    return "\n".join(["AutoDetect=off", *lines, ""])


def slurm_conf(folder: Path, hostname: str) -> str:
    return "\n".join(
        [
            "ClusterName=adpa-test",
            f"SlurmctldHost={hostname}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={folder / 'munge.socket'}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            # No cgroups in a container: plain process tracking, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "GresTypes=gpu",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "MinJobAge=600",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            node_line(hostname),
            f"PartitionName=cpu Nodes={hostname} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def environment(folder: Path) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}


def start(folder: Path, timeout: float = 60.0) -> dict[str, str]:
    """Start the three daemons; return the environment in which Slurm's clients reach them."""
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"Slurm is not installed (no {', '.join(missing)}): apt-get install {PACKAGES}")
    folder = folder.resolve()
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        if not (SYSTEM_CONF.is_symlink() and SYSTEM_CONF.resolve() == folder / "slurm.conf"):
            raise RuntimeError(
                f"{SYSTEM_CONF} exists: this machine already has a Slurm setup, not starting a test cluster"
            )
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    hostname = socket.gethostname().split(".")[0]
    (folder / "slurm.conf").write_text(slurm_conf(folder, hostname))
    (folder / "gres.conf").write_text(gres_conf(folder, hostname))
    for index in range(GPUS):  # slurmd wants a character device behind each GPU
        device = folder / f"gpu{index}"
        if not device.is_symlink():
            device.symlink_to("/dev/null")
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    if not SYSTEM_CONF.is_symlink():
        SYSTEM_CONF.symlink_to(folder / "slurm.conf")
    key = folder / "munge.key"
    if not key.exists():
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
    key.chmod(0o600)
    env = environment(folder)
    subprocess.run(
        [
            "munged",
            "--force",
            f"--socket={folder / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munged.seed'}",
        ],
        check=True,
    )
    conf = str(folder / "slurm.conf")
    subprocess.run(["slurmctld", "-f", conf], check=True, env=env)
    subprocess.run(["slurmd", "-f", conf], check=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout.strip()
        if state in {"idle", "mixed"}:
            return env
        time.sleep(1)
    stop(folder)
    raise RuntimeError(f"the Slurm node did not come up in {timeout:.0f} s (state {state!r}); logs in {folder}")


def stop(folder: Path) -> None:
    """Stop the daemons this folder's pid files name (slurmd first, munged last)."""
    for daemon in reversed(DAEMONS):
        pid_file = folder / f"{daemon}.pid"
        if not pid_file.exists():
            continue
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.resolve() == (folder / "slurm.conf").resolve():
        SYSTEM_CONF.unlink()


if __name__ == "__main__":
    command, where = sys.argv[1], Path(sys.argv[2])
    if command == "start":
        start(where)
        print(f"export SLURM_CONF={where.resolve() / 'slurm.conf'}")
    else:
        stop(where)
