"""Preemption-safe training: on SIGTERM or SIGUSR1 a training stage saves a checkpoint at the end of
the current optimizer step and exits non-zero, so that the next run resumes from that step.

Slurm sends SIGTERM when it preempts a job or at its time limit (SIGKILL follows after the grace
time), and ahead of the limit when asked with --signal (launch.stop_signal_before_limit). The
signal only sets a flag; the ranks act on it together, because saving a ZeRO-3 checkpoint is
collective and a signal may reach them at different steps: at each step's end they all-reduce it.
The job's shell ignores the two signals and torch's launcher forwards SIGTERM and waits for the
ranks (adpa.workflow.launch.stop_signal_prefix), so that neither dies first and takes the job step with them.
"""

from __future__ import annotations

import signal
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received = 0  # the first signal caught, 0 for none


def _record(signum: int, frame: Any) -> None:
    global _received
    _received = _received or signum


def install() -> None:
    """From now on SIGTERM and SIGUSR1 only set the flag that the step-end check reads (main thread)."""
    for signum in SIGNALS:
        signal.signal(signum, _record)


def received() -> int:
    """The signal caught in this process, 0 for none."""
    return _received


class Preempted(Exception):
    """Training stopped on a signal with its step saved; the stage exits with 128 + the signal."""

    def __init__(self, stage: str, signum: int, step: int, checkpoint: str | None) -> None:
        self.exit_code = 128 + signum
        super().__init__(
            f"{stage}: stopped by {signal.Signals(signum).name} at step {step}, saved in {checkpoint}; "
            "the next run resumes from there"
        )


def agreed_signal(device: Any) -> int:
    """The signal any rank caught (the largest number), 0 when none did: every rank calls this at the
    same step, so all of them stop there or none does."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _received
    flag = torch.tensor([_received], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def stop_on_signal():
    """A TrainerCallback that, once a signal is caught, has the Trainer log, save a checkpoint and stop
    at the end of the current optimizer step. `stopped` holds (signal, step) when it did."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self) -> None:
            self.stopped: tuple[int, int] | None = None

        def on_step_end(self, args, state, control, **kwargs):
            signum = agreed_signal(args.device)
            if signum:
                self.stopped = (signum, state.global_step)
                control.should_log = control.should_save = control.should_training_stop = True
            return control

    return StopOnSignal()
