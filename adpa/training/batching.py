"""The effective batch: gradient accumulation derived from it, for the config check and the trainers alike."""

from __future__ import annotations

from collections.abc import Mapping

from adpa.core.errors import ConfigError


def accumulation_steps(training: Mapping, processes: int, key: str) -> int:
    """effective_batch_size / (per_device_batch_size x processes); refuses a remainder."""
    per_step = training["per_device_batch_size"] * processes
    steps, remainder = divmod(training["effective_batch_size"], per_step)
    if remainder or steps == 0:
        raise ConfigError(
            f"config key '{key}.effective_batch_size': {training['effective_batch_size']} is not a "
            f"multiple of per_device_batch_size x processes = "
            f"{training['per_device_batch_size']} x {processes} = {per_step}"
        )
    return steps
