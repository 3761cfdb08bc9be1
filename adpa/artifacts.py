"""Publishing finished models: a declared output appears complete, with its manifest, or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MANIFEST = "adpa_manifest.json"


def staging_dir(output: str | os.PathLike) -> Path:
    """A sibling of the output (same filesystem, so the final rename is atomic)."""
    output = Path(output)
    return output.with_name(f".{output.name}.partial")


def fresh_staging_dir(output: str | os.PathLike) -> Path:
    staging = staging_dir(output)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def params_hash(params_json: str) -> str:
    return hashlib.sha256(params_json.encode()).hexdigest()[:16]


SLURM_FACTS = {"job_id": "SLURM_JOB_ID", "nodes": "SLURM_JOB_NODELIST", "partition": "SLURM_JOB_PARTITION"}


def write_manifest(
    directory: str | os.PathLike,
    stage: str,
    params: Mapping[str, Any],
    params_json: str,
    code_hash: str,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    from importlib.metadata import version

    manifest = {
        "stage": stage,
        "config_hash": params_hash(params_json),
        "code_hash": code_hash,
        "params": params,
        "metrics": dict(metrics),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        # Where it ran: the Slurm job (and its nodes) when the workflow ran through Slurm.
        "slurm": {key: os.environ[name] for key, name in SLURM_FACTS.items() if name in os.environ} or None,
        "versions": {
            "python": platform.python_version(),
            **{package: version(package) for package in ("torch", "transformers", "trl", "accelerate", "deepspeed")},
        },
        **(extra or {}),
    }
    Path(directory, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def publish(staging: str | os.PathLike, output: str | os.PathLike) -> None:
    """Move a complete staging folder into place; refuses to replace an existing output."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"refusing to overwrite finished output '{output}'")
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, output)


def discard(folder: str | os.PathLike) -> None:
    """Delete a folder so that a kill midway leaves none of it under its own name: a half-deleted
    work folder could hold a checkpoint whose trainer_state.json survived its weights, which a
    rerun would take as complete. Remains of an earlier cut-off discard go too."""
    folder = Path(folder)
    doomed = folder.with_name(f".{folder.name}.discarded")
    shutil.rmtree(doomed, ignore_errors=True)
    if folder.exists():
        os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
