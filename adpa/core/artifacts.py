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
# A training checkpoint holds AdamW's state (fp32 master weights and two moments) beside the
# weights at their saved precision: 16 bytes per parameter in fp32, as a real 2-process ZeRO-3
# checkpoint measures (tests/test_resume.py), 14 with 16-bit weights.
OPTIMIZER_BYTES_PER_PARAMETER = 12
# Plus the RNG, scheduler and trainer state and DeepSpeed's conversion scripts (about 0.12 MB).
CHECKPOINT_STATE_BYTES = 1_000_000


def checkpoint_bytes(parameters: int, weight_bytes: int, other_files: int = 0) -> int:
    """Bytes of one checkpoint; `other_files`: what the model folder holds besides weights (tokenizer)."""
    return parameters * (OPTIMIZER_BYTES_PER_PARAMETER + weight_bytes) + other_files + CHECKPOINT_STATE_BYTES


# A trained model's files, hard-linked into its work folder when it is published, so that a kill
# before Snakemake records the job costs one republish, not the training (republish, clean_work).
EXPORTED = "exported"


def free_bytes(folder: str | os.PathLike) -> int:
    """Free space on the device of `folder`, or of its nearest existing parent (not created yet)."""
    for candidate in (Path(folder), *Path(folder).parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


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


def work_key(config_hash: str, code_hash: str, parents: Mapping[str, Any]) -> str:
    """The name of a training stage's work folder (checkpoints, the exported model): its settings,
    its code and its inputs (each input's path and the settings and code that made it), so that no
    run resumes or republishes what was trained from other inputs; the points of a top-k sweep, for
    one, differ only in their store."""
    inputs = hashlib.sha256(json.dumps(parents, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{config_hash}-{code_hash}-{inputs}"


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


def link_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a folder by hard links (free on one filesystem; a plain copy across two), the manifest
    last: a copy cut off midway has no manifest and never counts as a model."""
    source, target = Path(source), Path(target)
    files = sorted((path for path in source.rglob("*") if path.is_file()), key=lambda path: path.name == MANIFEST)
    target.mkdir(parents=True)
    for path in files:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(path, destination)


def keep_exported(staging: str | os.PathLike, work_dir: str | os.PathLike) -> Path:
    """Link a complete staging folder into `work_dir/exported` (replacing an older one) before it is published."""
    exported = Path(work_dir) / EXPORTED
    partial = exported.with_name(f".{EXPORTED}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    link_tree(staging, partial)
    discard(exported)
    os.replace(partial, exported)
    return exported


def clear_checkpoints(work_dir: str | os.PathLike) -> None:
    """After publishing: free the checkpoints (and logs) of a work folder, keep its exported model."""
    work_dir = Path(work_dir)
    for entry in sorted(work_dir.iterdir()) if work_dir.is_dir() else ():
        if entry.name == EXPORTED:
            continue
        if entry.is_dir():
            discard(entry)
        else:
            entry.unlink()


def republish(work_dir: str | os.PathLike, output: str | os.PathLike) -> bool:
    """Publish the model a killed run already trained and exported (its manifest is there), without
    training again; False when there is none. The work folder is keyed by settings, code and inputs
    (work_key), so an exported model is exactly what this job would train."""
    exported = Path(work_dir) / EXPORTED
    if not (exported / MANIFEST).is_file():
        return False
    staging = staging_dir(output)
    shutil.rmtree(staging, ignore_errors=True)
    link_tree(exported, staging)
    publish(staging, output)
    return True


def clean_work(results: str | os.PathLike, work_root: str | os.PathLike) -> list[Path]:
    """Remove the work folders of models that are published under `results` (run once Snakemake has
    recorded every job: the workflow's onsuccess). Returns what it removed."""
    work_root = Path(work_root)
    published = set()
    for manifest_path in Path(results).rglob(MANIFEST):
        try:
            manifest = json.loads(manifest_path.read_text())
            published.add(
                (
                    manifest["stage"],
                    work_key(manifest["config_hash"], manifest["code_hash"], manifest.get("parents", {})),
                )
            )
        except (OSError, ValueError, KeyError):
            continue
    removed = []
    for stage in sorted(work_root.iterdir()) if work_root.is_dir() else ():
        for folder in sorted(stage.iterdir()) if stage.is_dir() else ():
            if (stage.name, folder.name) in published:
                discard(folder)
                removed.append(folder)
    return removed
