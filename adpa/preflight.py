"""Checks that read more than the config text: models, dataset rows, vocabularies, devices, disk.

Run by `python -m adpa check --configfile ...` and, before the first job, by the workflow
(`onstart`). The first problem found is raised as one InputError line naming the key, file or row.
The config-text checks (schema, local paths, judge files) run earlier, when the workflow is parsed.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adpa.config import (
    STUDENT_MODELS,
    ConfigError,
    InputError,
    expand_path,
    is_local,
    produced_paths,
    student_seeds,
)
from adpa.launch import gpus_per_machine

# Checkpoint bytes per parameter under AdamW: fp32 weights, two moments, plus a 16-bit copy.
CHECKPOINT_BYTES_PER_PARAMETER = 14
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 4}  # auto: fp32 weights at worst
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in OFFLINE_VARIABLES)


def _model_sources(config: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The models the config names by `path` (GGUF and teacher cuts are made by the workflow)."""
    return [(name, spec) for name, spec in config["models"].items() if "path" in spec]


def check_models(config: Mapping[str, Any]) -> None:
    """Local folders hold a config.json; hub ids are in the cache when the hub is offline."""
    for name, spec in _model_sources(config):
        reference = spec["path"]
        if is_local(reference):
            from adpa.models import check_model_reference

            try:
                check_model_reference(reference)
            except InputError as err:
                raise ConfigError(f"config key 'models.{name}.path': {err}") from err
        elif _offline():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(reference, "config.json", revision=spec.get("revision"))
            if not isinstance(cached, str):
                raise ConfigError(
                    f"config key 'models.{name}.path': hub id '{reference}' is not in the local cache and the hub "
                    "is offline (HF_HUB_OFFLINE); download it first or point to a local folder"
                )


def check_datasets(config: Mapping[str, Any]) -> None:
    """Every row of the training (and held-out) splits the stages will read is valid."""
    produced = produced_paths(config)
    for name in ("sft", "preference"):
        spec = config["datasets"][name]
        if spec["path"] in produced:
            continue  # written by generate_data, from the task generator
        from adpa import data

        load = data.load_sft if name == "sft" else data.load_preference
        for split in (spec["train_split"], spec["test_split"]):
            if split is None:
                continue
            try:
                load(spec, split)
            except ConnectionError as error:  # a hub dataset while the hub cannot be reached
                raise ConfigError(f"config key 'datasets.{name}.path': {error}; download it first or point to a local copy") from error


def check_vocabularies(config: Mapping[str, Any]) -> None:
    """Distillation needs one vocabulary: compare teacher and student tokenizers when both are named."""
    sources = dict(_model_sources(config))
    if "base_teacher" not in sources or "base_student" not in sources:
        return  # a GGUF teacher, or a student cut from the teacher: the same tokenizer by construction
    from adpa.models import check_same_vocabulary, load_tokenizer

    teacher, student = sources["base_teacher"], sources["base_student"]
    teacher_tokenizer = load_tokenizer(teacher["path"], teacher["trust_remote_code"], teacher.get("revision"))
    check_same_vocabulary(teacher_tokenizer, student["path"], student["trust_remote_code"])


def check_devices(config: Mapping[str, Any], workflow_dir: str | os.PathLike, available: int | None = None) -> None:
    """This machine has the GPUs one machine of a training job needs (CUDA_VISIBLE_DEVICES counts)."""
    wanted = gpus_per_machine(config, workflow_dir)
    if wanted == 0:
        return
    if available is None:
        import torch

        available = torch.cuda.device_count()
    if available < wanted:
        raise ConfigError(
            f"config key 'launch.num_processes': {wanted} GPUs requested ({config['launch']['accelerate_config']}), "
            f"this machine has {available}"
        )


def parameter_count(reference: str) -> int | None:
    """From the safetensors headers of a local folder or, online, of the hub repo; None if unknown."""
    if is_local(reference):
        from safetensors import safe_open

        total = 0
        for file in Path(expand_path(reference)).glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    total += math.prod(handle.get_slice(key).get_shape())
        return total or None
    if _offline():
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        return sum(get_safetensors_metadata(reference).parameter_count.values())
    except Exception:  # no network, gated repo, no safetensors: no estimate, not an error
        return None


def required_disk_bytes(config: Mapping[str, Any], parameters: Mapping[str, int | None]) -> int:
    """Peak bytes: the largest stage's kept checkpoints plus every trained model's final weights."""
    keep = config["launch"]["save_total_limit"]
    final_bytes = PRECISION_BYTES[config["precision"]]
    teacher, student = parameters.get("base_teacher"), parameters.get("base_student")
    per_stage = {"ref_teacher": teacher, "dpo_teacher": teacher, **dict.fromkeys(STUDENT_MODELS, student)}
    known = {stage: count for stage, count in per_stage.items() if count}
    if not known:
        return 0
    seeds = len(student_seeds(config))
    checkpoints = max(count * CHECKPOINT_BYTES_PER_PARAMETER * keep for count in known.values())
    finals = sum(count * final_bytes * (1 if stage in ("ref_teacher", "dpo_teacher") else seeds)
                 for stage, count in known.items())
    return checkpoints + finals


def check_disk(config: Mapping[str, Any], workflow_dir: str | os.PathLike) -> None:
    parameters = {name: parameter_count(spec["path"]) for name, spec in _model_sources(config)}
    needed = required_disk_bytes(config, parameters)
    if not needed:
        return
    folder = Path(workflow_dir, expand_path(config["work_dir"]))
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ConfigError(
            f"config key 'work_dir': about {needed / 1e9:.1f} GB of checkpoints and models to write, "
            f"{free / 1e9:.1f} GB free at {folder} (launch.save_total_limit = {config['launch']['save_total_limit']})"
        )


def run_preflight(config: Mapping[str, Any], workflow_dir: str | os.PathLike, local_jobs: bool = True) -> None:
    """Cheap checks first: a typo is reported before a dataset is read. The GPU count is only
    checked when jobs run on this machine (not when Slurm places them on GPU nodes)."""
    if local_jobs:
        check_devices(config, workflow_dir)
    check_models(config)
    check_disk(config, workflow_dir)
    check_datasets(config)
    check_vocabularies(config)
