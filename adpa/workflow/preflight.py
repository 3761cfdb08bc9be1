"""Checks that read more than the config text: models, dataset rows, vocabularies, devices, disk.

Each is registered under the keys it judges (adpa/workflow/checks.py, phase "preflight"; the table at the
end of this module) and run by `python -m adpa check --configfile ...` (every stage) and, before
the first job, by the workflow (`onstart`, only what the planned jobs read). The first problem
found is raised as one InputError line naming the key, file or row. The config-text checks (schema,
local paths, judge files) run earlier, when the workflow is parsed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from adpa.core.artifacts import checkpoint_bytes, free_bytes
from adpa.core.errors import ConfigError, InputError
from adpa.core.paths import expand_path, is_local
from adpa.dag.stages import STAGES, max_length_key, of_kind, reading, student_models
from adpa.modeling.lora import check_quantization
from adpa.workflow.checks import Context, Plan, key_check, run_checks
from adpa.workflow.config import gradient_accumulation_steps, plan_sweeps, produced_paths, student_seeds, world_size
from adpa.workflow.launch import gpus_per_machine
from adpa.workflow.lora_targets import check_target_modules, teacher_model_config

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 4}  # auto: fp32 weights at worst
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_TIMEOUT_S = 10
PRE_DOWNLOAD = "download it first (`hf download {repo}{kind}` where the hub is reachable, then HF_HUB_OFFLINE=1) or point to a local copy"

TRAINING_RULES = of_kind("training")
LORA_TEACHERS = ("ref_teacher", "dpo_teacher")


def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in OFFLINE_VARIABLES)


def models_read(config: Mapping[str, Any], plan: Plan) -> list[str]:
    """The configured models (base_teacher, base_student) that the planned jobs load."""
    student = config["models"]["base_student"]
    names = []
    # The base teacher's own folder or hub id: read by the stages that say so, and its own evaluation.
    if plan.runs(*reading("base_teacher")) or plan.evaluates("base_teacher"):
        names.append("base_teacher")
    if "path" in student and plan.runs(*reading("base_student")):
        names.append("base_student")
    return names


def _model_sources(config: Mapping[str, Any], names: Iterable[str]) -> list[tuple[str, Mapping[str, Any]]]:
    """Those of `names` given by `path` (GGUF models and teacher cuts are made by the workflow)."""
    return [(name, config["models"][name]) for name in names if "path" in config["models"][name]]


def check_hub_model(key: str, repo: str, revision: str | None) -> bool:
    """A hub id is usable if its config is cached, or if the hub answers for it. True: it is cached."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return True
    if _offline():
        raise ConfigError(
            f"config key '{key}': hub id '{repo}' is not in the local cache and the hub is offline "
            f"(HF_HUB_OFFLINE); {PRE_DOWNLOAD.format(repo=repo, kind='')}"
        )
    _ask_hub(key, repo, revision, "model")
    return False


def _ask_hub(key: str, repo: str, revision: str | None, kind: str) -> None:
    """One request, no retries: a missing repo, a missing revision or an unreachable hub is one line."""
    from huggingface_hub import dataset_info, model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    local = Path(expand_path(repo)).absolute()
    try:
        (model_info if kind == "model" else dataset_info)(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except RevisionNotFoundError as err:
        raise ConfigError(f"config key '{key}': the hub {kind} '{repo}' has no revision '{revision}'") from err
    except GatedRepoError as err:
        raise ConfigError(
            f"config key '{key}': the hub {kind} '{repo}' is gated: log in (`hf auth login`) "
            "with an account that was granted access"
        ) from err
    except RepositoryNotFoundError as err:
        raise ConfigError(
            f"config key '{key}': '{repo}' is neither a local folder (no such folder: {local}) nor a {kind} on the hub"
        ) from err
    except Exception as err:  # DNS, proxy, timeout: whatever the transport raises
        repo_type = "" if kind == "model" else " --repo-type dataset"
        raise ConfigError(
            f"config key '{key}': '{repo}' is not a local folder (no such folder: {local}) and the hub cannot be "
            f"reached ({type(err).__name__}); {PRE_DOWNLOAD.format(repo=repo, kind=repo_type)}"
        ) from err


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def check_loadable(key: str, reference: str, spec: Mapping[str, Any], chat_template: str | None) -> None:
    """Load what a job will load first, the way it loads it: the architecture (AutoConfig knows the
    model_type) and the tokenizer; the teacher's tokenizer (every stage's) needs a chat template,
    its own or the config's `chat_template`. Local folders, or hub ids already in the cache."""
    from transformers import AutoConfig

    from adpa.modeling.models import load_tokenizer

    trust, revision = spec.get("trust_remote_code", False), spec.get("revision")
    try:
        AutoConfig.from_pretrained(expand_path(reference), trust_remote_code=trust, revision=revision)
    except (ValueError, KeyError, OSError) as err:
        model_type = _model_type(reference)
        known = (
            f"model_type '{model_type}' is not an architecture this transformers knows"
            if model_type
            else _first_line(err)
        )
        hint = "" if trust else " (custom code needs trust_remote_code: true, only for a model you trust)"
        raise ConfigError(f"config key '{key}': '{reference}': {known}{hint}") from err
    try:
        tokenizer = load_tokenizer(reference, trust, revision)
    except (ValueError, OSError, TypeError, KeyError) as err:
        raise ConfigError(
            f"config key '{key}': '{reference}' has no loadable tokenizer (tokenizer.json or tokenizer.model, "
            f"with tokenizer_config.json): {_first_line(err)}"
        ) from err
    if chat_template is not None or key != "models.base_teacher.path":
        return
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"config key '{key}': the tokenizer of '{reference}' has no chat template; set the config's chat_template"
        )


def _model_type(reference: str) -> str | None:
    try:
        return json.loads((Path(expand_path(reference)) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def check_models(config: Mapping[str, Any], plan: Plan | None = None) -> None:
    """Local folders are complete model folders that load; hub ids are cached (and then load) or answered by the hub."""
    for name, spec in _model_sources(config, models_read(config, plan or Plan.all())):
        reference, key = spec["path"], f"models.{name}.path"
        if is_local(reference):
            from adpa.modeling.models import check_model_reference, check_safetensors_headers

            try:
                check_model_reference(reference)
                check_safetensors_headers(reference)
            except InputError as err:
                raise ConfigError(f"config key '{key}': {err}") from err
            check_loadable(key, reference, spec, config.get("chat_template"))
        elif check_hub_model(key, reference, spec.get("revision")) and _offline():
            # Offline the jobs load from the cache alone, so all of it must be there; online they download the rest.
            check_loadable(key, reference, spec, config.get("chat_template"))


def check_gguf(config: Mapping[str, Any], plan: Plan) -> None:
    """A GGUF base teacher needs the `gguf` package and the file in its package; random sizes must fit."""
    spec = config["models"]["base_teacher"]
    if "gguf" not in spec or not plan.runs("base_teacher"):
        return
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "config key 'models.base_teacher.gguf': reading GGUF files needs the 'gguf' package "
            "(pip install gguf; see README install)"
        )
    from adpa.modeling.models import gguf_location

    try:
        gguf_location(spec["gguf"])
    except InputError as err:
        raise ConfigError(f"config key 'models.base_teacher.gguf': {err}") from err
    sizes = spec.get("random_init")
    if sizes:
        hidden, heads, kv_heads = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
        if hidden % heads:
            raise ConfigError(
                f"config key 'models.base_teacher.random_init.num_attention_heads': {heads} heads do "
                f"not divide hidden_size {hidden}"
            )
        if heads % kv_heads:
            raise ConfigError(
                f"config key 'models.base_teacher.random_init.num_key_value_heads': {kv_heads} do not "
                f"divide num_attention_heads {heads}"
            )


def teacher_shape(config: Mapping[str, Any]) -> dict[str, int]:
    """The base teacher's vocabulary size and depth, from what is on disk (empty when unknown)."""
    spec = config["models"]["base_teacher"]
    if "gguf" in spec:
        shape = _gguf_shape(spec["gguf"])
        if spec.get("random_init"):
            shape["num_hidden_layers"] = spec["random_init"]["num_hidden_layers"]
        return shape
    reference = spec["path"]
    if is_local(reference):
        config_file: Path | None = Path(expand_path(reference)) / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(reference, "config.json", revision=spec.get("revision"))
        config_file = Path(cached) if isinstance(cached, str) else None
    if config_file is None or not config_file.is_file():
        return {}
    model_config = json.loads(config_file.read_text(encoding="utf-8"))
    model_config = {**model_config.get("text_config", {}), **model_config}
    return {
        key: model_config[key] for key in ("vocab_size", "num_hidden_layers") if isinstance(model_config.get(key), int)
    }


def _gguf_shape(gguf: Mapping[str, str]) -> dict[str, int]:
    from gguf import GGUFReader

    from adpa.modeling.models import gguf_location

    folder, file = gguf_location(gguf)
    fields = GGUFReader(str(folder / file)).fields
    architecture = bytes(fields["general.architecture"].parts[-1]).decode()
    shape = {}
    if "tokenizer.ggml.tokens" in fields:
        shape["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    if f"{architecture}.block_count" in fields:
        shape["num_hidden_layers"] = int(fields[f"{architecture}.block_count"].parts[-1][0])
    return shape


def check_teacher_shape(config: Mapping[str, Any], plan: Plan) -> None:
    """Settings that depend on the teacher's size: the student cut's layers, the top-k of the store."""
    cut = config["models"]["base_student"].get("teacher_layers")
    checks_cut = cut is not None and plan.runs("base_student")
    checks_k = plan.runs("teacher_topk", "advantage", "chosen_advantage")
    if not (checks_cut or checks_k):
        return
    shape = teacher_shape(config)
    layers, vocabulary = shape.get("num_hidden_layers"), shape.get("vocab_size")
    if checks_cut and layers is not None:
        keep = list(range(cut)) if isinstance(cut, int) else sorted(cut)
        if len(keep) >= layers or keep[-1] >= layers:
            raise ConfigError(
                f"config key 'models.base_student.teacher_layers': {cut} must select fewer than the "
                f"teacher's {layers} layers (indices 0..{layers - 1})"
            )
    k = config["teacher_topk"]["k"]
    if checks_k and vocabulary is not None and k > vocabulary:
        raise ConfigError(
            f"config key 'teacher_topk.k': {k} is more than the teacher's vocabulary of {vocabulary} tokens"
        )


def evaluation_split(config: Mapping[str, Any]) -> str | None:
    return config["evaluation"]["split"] or config["datasets"]["preference"]["test_split"]


def dataset_splits(config: Mapping[str, Any], plan: Plan) -> dict[str, list[tuple[str, str]]]:
    """Per dataset, the (config key, split) pairs the planned jobs read."""
    sft, preference = config["datasets"]["sft"], config["datasets"]["preference"]
    read: dict[str, list[tuple[str, str]]] = {"sft": [], "preference": []}
    if plan.runs(*reading("sft_data")):
        read["sft"].append(("datasets.sft.train_split", sft["train_split"]))
        if sft["test_split"] is not None:
            read["sft"].append(("datasets.sft.test_split", sft["test_split"]))
    if plan.runs(*(name for name in reading("preference_data") if name != "evaluate")):
        read["preference"].append(("datasets.preference.train_split", preference["train_split"]))
    if plan.runs("evaluate"):
        split = evaluation_split(config)
        if split is None:
            raise ConfigError(
                "config key 'datasets.preference.test_split': null, but evaluation needs a held-out "
                "split (name it, or set evaluation.split)"
            )
        key = "evaluation.split" if config["evaluation"]["split"] else "datasets.preference.test_split"
        read["preference"].append((key, split))
    return read


def _generated_splits(config: Mapping[str, Any]) -> set[str]:
    generate = config["datasets"]["generate"]
    return {"train", "test"} | ({"validation"} if generate.get("validation_rows") else set())


def check_datasets(config: Mapping[str, Any], plan: Plan | None = None) -> dict[str, Any]:
    """Every row of the splits the planned jobs read is valid (generated splits: their names exist).

    Returns the training split of each configured (not generated) dataset it read, by name."""
    produced, loaded = produced_paths(config), {}
    for name, splits in dataset_splits(config, plan or Plan.all()).items():
        spec = config["datasets"][name]
        if spec["path"] in produced:
            for key, split in splits:
                if split not in _generated_splits(config):
                    raise ConfigError(
                        f"config key '{key}': the generated dataset has no split '{split}' "
                        f"(it has: {', '.join(sorted(_generated_splits(config)))})"
                    )
            continue
        if not splits:
            continue
        from adpa.inputs import data

        if not is_local(spec["path"]) and not _offline():
            _ask_hub(f"datasets.{name}.path", spec["path"], None, "dataset")
        load = data.load_sft if name == "sft" else data.load_preference
        for _, split in splits:
            try:
                rows = load(spec, split)
            except ConnectionError as error:  # a hub dataset while the hub cannot be reached
                raise ConfigError(
                    f"config key 'datasets.{name}.path': {error}; "
                    f"{PRE_DOWNLOAD.format(repo=spec['path'], kind=' --repo-type dataset')}"
                ) from error
            if split == spec.get("train_split", "train"):
                loaded[name] = rows
    return loaded


# Stages that tokenize for themselves and align rows with stores: one prompt that fills max_length is an error.
ROW_ALIGNED_RUNNERS = ("adpa.training.distill:run_distillation", "adpa.infer.inference:")


def _prompt_readers(config: Mapping[str, Any], plan: Plan) -> list[tuple[str, str, str, bool]]:
    """(stage, dataset, max_length key, every row must fit) for the planned stages that truncate prompts."""
    readers = []
    for stage in STAGES.values():
        key = max_length_key(stage.name)
        if key is None or not plan.runs(stage.name):
            continue
        if "sft_data" in stage.reads and config[stage.section].get("completion_only_loss"):
            readers.append((stage.name, "sft", key, False))  # loss on every token: a cut row still trains
        elif "preference_data" in stage.reads:
            readers.append((stage.name, "preference", key, stage.runner.startswith(ROW_ALIGNED_RUNNERS)))
    return readers


def teacher_tokenizer(config: Mapping[str, Any], results: str | os.PathLike = "results"):
    """The base teacher's tokenizer with the run's chat template, as every stage tokenizes; None when
    it cannot be had before the first job (a hub id online: no download here). A GGUF teacher's is
    the published base teacher's when that folder was made from the same source, else the GGUF file's."""
    from adpa.modeling.models import load_tokenizer

    teacher = config["models"]["base_teacher"]
    if "path" in teacher:
        if not (is_local(teacher["path"]) or _offline()):
            return None
        tokenizer = load_tokenizer(teacher["path"], teacher.get("trust_remote_code", False), teacher.get("revision"))
    else:
        published = Path(results, "base_teacher")
        manifest = published / "adpa_manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8"))["params"].get("model") == teacher:
            tokenizer = load_tokenizer(str(published))
        else:
            from transformers import AutoTokenizer

            from adpa.modeling.models import gguf_location

            folder, file = gguf_location(teacher["gguf"])
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    if config.get("chat_template"):
        tokenizer.chat_template = config["chat_template"]
    return tokenizer


def check_prompt_lengths(
    config: Mapping[str, Any], plan: Plan, loaded: Mapping[str, Any], results: str | os.PathLike = "results"
) -> list[str]:
    """Prompts against each planned stage's max_length, with the teacher's tokenizer and chat template
    (every stage's): no row left is one error line, some rows left out a warning (returned). Needs the
    teacher's tokenizer before any job (teacher_tokenizer); the stages count again, exactly, when they start."""
    generate, produced = config["datasets"]["generate"], produced_paths(config)
    generated = {name for name in ("sft", "preference") if config["datasets"][name]["path"] in produced}
    readers = [reader for reader in _prompt_readers(config, plan) if reader[1] in loaded or reader[1] in generated]
    if not readers:
        return []
    from adpa.training.loss_rows import prompt_token_counts

    tokenizer = teacher_tokenizer(config, results)
    if tokenizer is None:
        return []
    lengths: dict[str, list[int]] = {}
    warnings = []
    for stage, dataset, key, every_row in readers:
        if dataset not in lengths:
            if dataset in loaded:
                rows = loaded[dataset]
                prompts = rows["prompt"] if "prompt" in rows.column_names else [row[:-1] for row in rows["messages"]]
            else:  # the generated data, as generate_data will write it
                from adpa.inputs.datagen import training_prompts

                prompts = training_prompts(generate)[dataset]
            lengths[dataset] = prompt_token_counts(tokenizer, prompts)
        section, _ = key.split(".", 1)
        limit = config[section]["max_length"]
        if limit is None:
            continue
        too_long = [index for index, length in enumerate(lengths[dataset]) if length >= limit]
        where = f"datasets.{dataset}"
        if len(too_long) == len(lengths[dataset]):
            raise ConfigError(
                f"config key '{key}': {limit} tokens leave no response token in any row of {where} for {stage} "
                f"(the shortest prompt has {min(lengths[dataset])} tokens)"
            )
        if too_long and every_row:
            first = too_long[0]
            raise ConfigError(
                f"config key '{key}': {limit} tokens leave no response token in {where} row {first} for {stage} "
                f"(its prompt has {lengths[dataset][first]} tokens; {len(too_long)} rows like it)"
            )
        if too_long:
            warnings.append(
                f"warning: {stage}: {len(too_long)} of {len(lengths[dataset])} rows of {where} keep no response token "
                f"within {key} = {limit} and will be left out"
            )
    return warnings


def check_vocabularies(config: Mapping[str, Any], plan: Plan | None = None) -> None:
    """Distillation needs one vocabulary: compare teacher and student tokenizers when both are named."""
    plan = plan or Plan.all()
    sources = dict(_model_sources(config, ("base_teacher", "base_student")))
    if "base_teacher" not in sources or "base_student" not in sources or not plan.runs("student_sft"):
        return  # a GGUF teacher, or a student cut from the teacher: the same tokenizer by construction
    from adpa.modeling.models import check_same_vocabulary, load_tokenizer

    teacher, student = sources["base_teacher"], sources["base_student"]
    teacher_tokenizer = load_tokenizer(teacher["path"], teacher["trust_remote_code"], teacher.get("revision"))
    check_same_vocabulary(teacher_tokenizer, student["path"], student["trust_remote_code"], student.get("revision"))


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


def check_trackers(config: Mapping[str, Any]) -> None:
    """Every configured tracker is importable here (each is the package of its name, which transformers'
    integration imports): otherwise the first training step would fail."""
    for tracker in config["launch"]["report_to"]:
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(
                f"config key 'launch.report_to': {tracker} is not installed "
                f'(pip install {tracker}, or pip install -e ".[trackers]"; or leave it out)'
            )


def parameter_count(reference: str) -> int | None:
    """From the safetensors headers of a local folder or, online, of the hub repo; None if unknown."""
    if is_local(reference):
        from safetensors import safe_open

        total = 0
        for file in Path(expand_path(reference)).glob("*.safetensors"):
            try:
                with safe_open(str(file), "pt") as handle:
                    for key in handle.keys():
                        total += math.prod(handle.get_slice(key).get_shape())
            except Exception:  # unreadable: check_models names the file; no estimate here
                return None
        return total or None
    if _offline():
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        return sum(get_safetensors_metadata(reference).parameter_count.values())
    except Exception:  # no network, gated repo, no safetensors: no estimate, not an error
        return None


def other_files_bytes(reference: str) -> int:
    """What a local model folder holds besides its weights (tokenizer, config); 0 for a hub id."""
    if not is_local(reference):
        return 0
    folder = Path(expand_path(reference))
    return sum(path.stat().st_size for path in folder.glob("*") if path.is_file() and path.suffix != ".safetensors")


def training_steps(config: Mapping[str, Any], stage: str, rows: int) -> int:
    """The optimizer steps a training stage runs on `rows` training rows, counted as the Trainer does
    (batches per process, accumulated; at least one a epoch). Packing only lowers it."""
    training = config[STAGES[stage].section]
    batches = math.ceil(rows / (training["per_device_batch_size"] * world_size(config)))
    per_epoch = max(1, math.ceil(batches / gradient_accumulation_steps(config, stage)))
    return math.ceil(training["epochs"] * per_epoch)


def checkpoints_kept(config: Mapping[str, Any], steps: int | None) -> int:
    """Checkpoints on disk at once: one every save_steps and one at the last step (the Trainer's
    rule), at most save_total_limit; unknown steps count the limit."""
    keep = config["launch"]["save_total_limit"]
    return keep if steps is None else min(keep, math.ceil(steps / config["launch"]["save_steps"]))


def training_rows(config: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, int]:
    """Training rows of each dataset, where known: read by the preflight, or the generator's count."""
    rows = {name: len(dataset) for name, dataset in loaded.items()}
    generate = config["datasets"]["generate"]
    for name in ("sft", "preference"):
        if generate and config["datasets"][name]["path"] in produced_paths(config):
            rows[name] = generate["train_rows"]
    return rows


def stage_steps(config: Mapping[str, Any], rows: Mapping[str, int]) -> dict[str, int]:
    """Each training stage's steps, where its training rows are known (the SFT set, or the preference pairs)."""
    steps = {}
    for stage in TRAINING_RULES:
        dataset = "sft" if "sft_data" in STAGES[stage].reads else "preference"
        if dataset in rows:
            steps[stage] = training_steps(config, stage, rows[dataset])
    return steps


def required_disk_bytes(
    config: Mapping[str, Any],
    parameters: Mapping[str, int | None],
    other_files: Mapping[str, int] | None = None,
    steps: Mapping[str, int] | None = None,
) -> int:
    """Peak bytes: the largest stage's kept checkpoints plus every trained model. `parameters` and
    `other_files` (tokenizer and config bytes) are those of the base models, by name; `steps` each
    training stage's steps, where known (a stage of fewer steps keeps fewer checkpoints)."""
    weight_bytes = PRECISION_BYTES[config["precision"]]
    steps = steps or {}
    files = other_files or {}
    bases = {
        "ref_teacher": "base_teacher",
        "dpo_teacher": "base_teacher",
        **dict.fromkeys(student_models(config["methods"]), "base_student"),
    }
    known = {stage: base for stage, base in bases.items() if parameters.get(base)}
    if not known:
        return 0

    def model(base: str) -> int:
        return parameters[base] * weight_bytes + files.get(base, 0)

    seeds = len(student_seeds(config))
    checkpoints = max(
        checkpoint_bytes(parameters[base], weight_bytes, files.get(base, 0))
        * checkpoints_kept(config, steps.get(stage))
        for stage, base in known.items()
    )
    finals = sum(
        model(base) * (1 if stage in ("ref_teacher", "dpo_teacher") else seeds) for stage, base in known.items()
    )
    # Each sweep point trains its retrained student stages again, per seed.
    swept = sum(
        len(sweep.swept) * sum(1 for stage in sweep.retrained if STAGES[stage].kind == "training")
        for sweep in plan_sweeps(config).values()
    )
    student = model("base_student") if parameters.get("base_student") else 0
    return checkpoints + finals + student * seeds * swept


def check_disk(
    config: Mapping[str, Any],
    workflow_dir: str | os.PathLike,
    plan: Plan | None = None,
    loaded: Mapping[str, Any] | None = None,
) -> None:
    """Room for the checkpoints and models to write; `loaded`: the training splits read (their rows count the steps)."""
    plan = plan or Plan.all()
    if not plan.runs(*TRAINING_RULES):
        return
    sources = dict(_model_sources(config, models_read(config, plan)))
    parameters = {name: parameter_count(spec["path"]) for name, spec in sources.items()}
    other_files = {name: other_files_bytes(spec["path"]) for name, spec in sources.items()}
    steps = stage_steps(config, training_rows(config, loaded or {}))
    needed = required_disk_bytes(config, parameters, other_files, steps)
    if not needed:
        return
    folder = Path(workflow_dir, expand_path(config["work_dir"]))
    while not folder.exists():  # the message names the folder measured
        folder = folder.parent
    free = free_bytes(folder)
    if free < needed:
        raise ConfigError(
            f"config key 'work_dir': about {needed / 1e9:.1f} GB of checkpoints and models to write, "
            f"{free / 1e9:.1f} GB free at {folder} (launch.save_total_limit = {config['launch']['save_total_limit']}, "
            f"launch.save_steps = {config['launch']['save_steps']})"
        )


# The preflight's checks, by the keys they judge: cheap ones first, so a typo is reported before a
# dataset is read; each runs only when a planned job reads its keys.
@key_check("launch.report_to", phase="preflight", stages=TRAINING_RULES)
def _trackers(config: Mapping[str, Any], context: Context) -> None:
    """Every tracker named is installed"""
    check_trackers(config)


@key_check("launch.num_processes", phase="preflight", stages=TRAINING_RULES)
def _devices(config: Mapping[str, Any], context: Context) -> None:
    """This machine has the GPUs a training job asks for (unless Slurm places the jobs)"""
    if context.local_jobs:
        check_devices(config, context.workflow_dir)


@key_check(*(f"{stage}.peft.load_in_4bit" for stage in LORA_TEACHERS), phase="preflight", stages=LORA_TEACHERS)
def _quantization(config: Mapping[str, Any], context: Context) -> None:
    """QLoRA has a CUDA GPU and bitsandbytes (unless Slurm places the jobs)"""
    for stage in LORA_TEACHERS:
        if context.local_jobs and context.plan.runs(stage):
            check_quantization(f"{stage}.peft", config[stage].get("peft"))


@key_check("models.base_teacher.gguf", "models.base_teacher.random_init", phase="preflight", stages=("base_teacher",))
def _gguf(config: Mapping[str, Any], context: Context) -> None:
    """The GGUF file is installed and the random_init sizes divide"""
    check_gguf(config, context.plan)


@key_check("datasets.preference.test_split", "evaluation.split", phase="preflight", stages=("evaluate",))
def _held_out_split(config: Mapping[str, Any], context: Context) -> None:
    """Evaluation has a held-out split to read"""
    dataset_splits(config, context.plan)


@key_check("models.base_teacher.path", "models.base_student.path", phase="preflight")
def _models(config: Mapping[str, Any], context: Context) -> None:
    """A local model folder is complete and loads (architecture, tokenizer, chat template); a hub id is cached or on the hub"""
    check_models(config, context.plan)


@key_check("models.base_student.teacher_layers", "teacher_topk.k", phase="preflight")
def _teacher_shape(config: Mapping[str, Any], context: Context) -> None:
    """Within the teacher's size: fewer layers than it has, a top-k within its vocabulary"""
    check_teacher_shape(config, context.plan)


@key_check(
    "datasets.generate.test_rows",
    "datasets.generate.validation_rows",
    "datasets.generate.train_rows",
    phase="preflight",
    stages=("generate_data",),
)
def _held_out_capacity(config: Mapping[str, Any], context: Context) -> None:
    """The task families hold enough prompts unseen in training for the held-out rows asked"""
    from adpa.inputs.datagen import check_generated_capacity

    check_generated_capacity(config["datasets"]["generate"])


@key_check(
    *(f"datasets.{name}.{key}" for name in ("sft", "preference") for key in ("path", "train_split", "test_split")),
    phase="preflight",
)
def _datasets(config: Mapping[str, Any], context: Context) -> None:
    """Every row of every split read is valid, and the splits exist and hold rows"""
    context.loaded.update(check_datasets(config, context.plan))


@key_check(*(f"{stage}.peft.target_modules" for stage in LORA_TEACHERS), phase="preflight", stages=LORA_TEACHERS)
def _target_modules(config: Mapping[str, Any], context: Context) -> None:
    """Every LoRA target name matches a module of the teacher (built from its config on the meta device)"""
    stages = [stage for stage in LORA_TEACHERS if context.plan.runs(stage) and config[stage].get("peft")]
    if not stages:
        return
    model_config = teacher_model_config(config)  # the teacher's architecture: both teachers share it
    for stage in stages:
        trust = config["models"]["base_teacher"]["trust_remote_code"]
        check_target_modules(f"{stage}.peft", config[stage]["peft"], model_config, trust)


@key_check("work_dir", "launch.save_total_limit", phase="preflight", stages=TRAINING_RULES)
def _disk(config: Mapping[str, Any], context: Context) -> None:
    """Room for the checkpoints the stages will write and every trained model"""
    check_disk(config, context.workflow_dir, context.plan, context.loaded)


@key_check("models.base_student.path", phase="preflight", stages=("student_sft",))
def _vocabularies(config: Mapping[str, Any], context: Context) -> None:
    """The student shares the teacher's vocabulary"""
    check_vocabularies(config, context.plan)


@key_check(*sorted({key for stage in STAGES if (key := max_length_key(stage))}), phase="preflight")
def _prompt_lengths(config: Mapping[str, Any], context: Context) -> None:
    """Leaves a response token in some row (in every row for the stages that align rows with stores)"""
    context.warnings += check_prompt_lengths(config, context.plan, context.loaded)


def run_preflight(
    config: Mapping[str, Any], workflow_dir: str | os.PathLike, local_jobs: bool = True, plan: Plan | None = None
) -> None:
    """Every preflight check the planned jobs need (all of them by default). The GPU count is only
    checked when training jobs run on this machine (not when Slurm places them on GPU nodes)."""
    context = Context(Path(workflow_dir), plan or Plan.all(), local_jobs)
    run_checks(config, "preflight", context)
    for warning in context.warnings:
        print(warning, file=sys.stderr)
