"""The inputs of the paper's judges, AlpacaEval and MT-Bench, read and checked row by row.

Light imports only: the workflow checks these files when it starts, before any job runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adpa.core.errors import InputError
from adpa.core.paths import expand_path

# Each judge's input file and the keys every one of its rows needs.
REQUIRED_KEYS = {"alpaca_eval": ("instruction",), "mt_bench": ("question_id", "turns")}


def read_records(path: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """A JSON list or JSONL of objects holding `required`; errors name the file and row."""
    file = Path(expand_path(path))
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"evaluation file '{file}': {err.strerror}") from err
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise InputError(f"evaluation file '{file}': not JSON or JSONL ({err.msg}, line {err.lineno})") from err
    if not records:
        raise InputError(f"evaluation file '{file}': no rows")
    for index, record in enumerate(records):
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise InputError(f"evaluation file '{file}' row {index}: missing '{missing[0]}'")
    return records


def check_judge_inputs(config: Mapping[str, Any]) -> None:
    """Read every configured judge input once, so a malformed row stops the run before training."""
    for name, required in REQUIRED_KEYS.items():
        path = config["evaluation"][name]
        if path:
            read_records(path, required)
