"""The files an evaluation writes, and their reader (the summary reads them without the evaluation's code)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
ANSWERS_FILE = "answers.jsonl"


def read_evaluation(directory: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """metrics.json and the answer records of one evaluation (older records lack the log-prob fields)."""
    directory = Path(directory)
    metrics = json.loads((directory / METRICS_FILE).read_text())
    answers = [json.loads(line) for line in (directory / ANSWERS_FILE).read_text().splitlines() if line]
    return metrics, answers
