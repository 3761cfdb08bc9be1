"""The errors that end a run before training with one `error:` line (no traceback)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input found before training; the message is one line naming the key, file or row."""


class ConfigError(InputError):
    """A config that cannot run."""
