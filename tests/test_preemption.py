"""A signal stops training at the same step on every rank (adpa/training/preemption.py); the real stop and
resume through Slurm is in tests/test_slurm.py."""

from __future__ import annotations

import multiprocessing
import os
import shlex
import signal
import socket

from conftest import REPO

from adpa.training import preemption
from adpa.workflow import config as adpa_config
from adpa.workflow import launch


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    preemption.install()
    before = preemption.agreed_signal("cpu")
    if rank == 1:  # only one rank is signalled, and it lives on
        os.kill(os.getpid(), signal.SIGUSR1)
    after = preemption.agreed_signal("cpu")
    results.put((rank, before, after, preemption.received()))
    dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_both_at_the_same_step():
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=_rank, args=(rank, port, results)) for rank in range(2)]
    for process in ranks:
        process.start()
    answers = sorted(results.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    usr1 = int(signal.SIGUSR1)
    # Both agree on nothing before the signal and on SIGUSR1 after it; only rank 1 caught it.
    assert answers == [(0, 0, usr1, 0), (1, 0, usr1, usr1)]


def test_stopped_stage_names_signal_step_and_checkpoint():
    stopped = preemption.Preempted("dpo_teacher", int(signal.SIGTERM), 7, "work/dpo_teacher/k/checkpoint-7")
    assert stopped.exit_code == 143
    assert str(stopped) == (
        "dpo_teacher: stopped by SIGTERM at step 7, saved in work/dpo_teacher/k/checkpoint-7; "
        "the next run resumes from there"
    )


def test_slurm_warns_training_jobs_before_their_time_limit_and_their_shell_waits_for_the_ranks():
    tiny = adpa_config.load_config(REPO / "config" / "tiny.yaml")
    assert launch.job_resources(tiny, REPO, "dpo_teacher")["slurm_extra"] == "--signal=TERM@300"
    assert "slurm_extra" not in launch.job_resources(tiny, REPO, "evaluate")  # inference jobs just rerun
    quiet = adpa_config.load_config(REPO / "config" / "tiny.yaml", {"launch": {"stop_signal_before_limit": None}})
    assert "slurm_extra" not in launch.job_resources(quiet, REPO, "dpo_teacher")
    words = shlex.split(launch.training_command(tiny, REPO))
    assert words[:4] == ["trap", "", "TERM", "USR1;"]
    # torch's launcher forwards SIGTERM to the ranks and waits as long for them before killing them.
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in words[: words.index("accelerate")]
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=30" in shlex.split(launch.training_command(quiet, REPO))
