"""Model and dataset references: a hub id (`org/name`) or a local path (may hold ~ and spaces)."""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def expand_path(path: str) -> str:
    return os.path.expanduser(path)


def is_local(reference: str) -> bool:
    """A hub id looks like `org/name` and does not exist on disk; everything else is a path."""
    expanded = expand_path(reference)
    return os.path.exists(expanded) or not HUB_ID.match(reference)
