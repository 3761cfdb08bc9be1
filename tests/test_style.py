"""The code is formatted and linted as configured in pyproject.toml (ruff for Python, snakefmt for the rules)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

PYTHON = ["adpa", "tests", "bench"]
RULES = ["Snakefile", "rules"]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", *PYTHON],
        ["ruff", "format", "--check", *PYTHON],
        ["snakefmt", "--check", *RULES],
    ],
    ids=["ruff check", "ruff format", "snakefmt"],
)
def test_code_is_formatted_and_linted(command):
    result = subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
