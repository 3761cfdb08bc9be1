"""Workflow configuration: schema validation with defaults, derived values, per-stage parameters.

Used by `rules/common.smk` and by `python -m adpa ... --configfile`, so both read a config the
same way. Light imports only: Snakemake imports this at parse time.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from adpa.core.errors import ConfigError
from adpa.core.paths import expand_path, is_local
from adpa.dag.methods import METHOD_ENTRIES, METHODS_BY_NAME, section_schema
from adpa.dag.methods import advantage_reference as advantage_store_reference
from adpa.dag.stages import STAGES, TEACHER_MODELS, Stage, of_kind, student_models
from adpa.dag.sweeps import Sweep, plan_sweep
from adpa.training.batching import accumulation_steps
from adpa.workflow.checks import Context, key_check, run_checks

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"
# libyaml's loader when present: the schema is read on every Snakemake start (`snakemake -n` latency).
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class StrictLoader(YAML_LOADER):  # type: ignore[misc, valid-type]
    """YAML's safe loader, except that a key written twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKeyError(
                    problem=f"key '{key}' written twice (the second would silently replace the first)",
                    problem_mark=key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Stages trained through accelerate launch; each has a config section of training settings.
TRAINING_STAGES = of_kind("training")


def _coerce_scalar(value: str, expected: str | list | None) -> Any:
    """Snakemake's nested --config overrides arrive as text ("0.2"); read them as the schema's type."""
    types = expected if isinstance(expected, list) else [expected]
    if "boolean" in types and value.lower() in ("true", "false"):  # auto, true or false: a switch
        return value.lower() == "true"
    if "string" in types:
        return value
    try:
        if "integer" in types and re.fullmatch(r"[+-]?\d+", value):
            return int(value)
        if "number" in types:
            return float(value)
    except ValueError:
        return value
    return value


def _with_defaults(validator_class: type) -> type:
    """A validator that fills each missing property with a copy of its schema default."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema) -> Iterator:
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if not isinstance(subschema, dict):
                    continue
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
                value = instance.get(name)
                if isinstance(value, str):
                    instance[name] = _coerce_scalar(value, subschema.get("type"))
                elif isinstance(value, list) and isinstance(subschema.get("items"), dict):
                    # --config 'seeds=[42,1,2]' arrives as a list of texts too.
                    item_type = subschema["items"].get("type")
                    instance[name] = [_coerce_scalar(v, item_type) if isinstance(v, str) else v for v in value]
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    """config/schema.yaml with what the registries declare: each student method's section (after
    `methods`), the `methods` enums and a resources key per stage."""
    with open(path, encoding="utf-8") as handle:
        schema = yaml.load(handle, Loader=YAML_LOADER)
    return with_registered_parts(schema)


def with_registered_parts(schema: dict) -> dict:
    properties = schema["properties"]
    names = [method.name for method in METHOD_ENTRIES]
    properties["methods"]["items"]["enum"] = names
    properties["methods"]["description"] += " The methods: " + "; ".join(
        f"{method.name}, {method.help}" for method in METHOD_ENTRIES
    )
    properties["sweeps"]["additionalProperties"]["properties"]["methods"]["items"]["enum"] = names
    resources = properties["resources"]["properties"]
    resources.update({stage: {"$ref": "#/definitions/job_resources"} for stage in STAGES if stage not in resources})
    training = schema["definitions"]["training_properties"]
    sections = {method.name: section_schema(method, training) for method in METHOD_ENTRIES if method.section is None}
    taken = sorted(set(sections) & set(properties))
    if taken:
        raise ValueError(f"config/schema.yaml: section '{taken[0]}' is a method's, declared in adpa/dag/methods.py")
    ordered: dict[str, Any] = {}
    for key, value in properties.items():
        ordered[key] = value
        if key == "methods":
            ordered.update(sections)
    schema["properties"] = ordered
    return schema


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        name = unknown[0] if unknown else "?"
        full = f"{key}.{name}" if error.absolute_path else name
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
        return f"config key '{full}': unknown key{hint}"
    if error.validator == "oneOf" and key.startswith("models"):
        return f"config key '{key}': give exactly one of 'path' (hub id or local folder) or 'gguf'"
    if error.schema.get("derived_from"):
        return (
            f"config key '{key}': derived from {error.schema['derived_from']}, not set "
            f"(got {error.instance!r}): remove it ({error.schema.get('description', '')})"
        )
    if error.validator == "pattern" and key.startswith("sweeps.") and key.endswith(".setting"):
        return f"config key '{key}': {error.instance!r} {_setting_hint(str(error.instance))}"
    if error.validator == "pattern":
        return f"config key '{key}': {error.instance!r} must be a plain name (letters, digits, '.', '_', '-')"
    if error.validator == "required" and not error.absolute_path:
        return f"config: {error.message} (a config file must name its models and datasets)"
    return f"config key '{key}': {error.message}"


def _setting_hint(setting: str) -> str:
    """What a sweep's setting should have been: `section.key`, with the sections that have the key."""
    from adpa.dag.sweeps import SWEEPABLE

    sections = sorted({STAGES[stage].section for stage in SWEEPABLE} - {None})
    properties = load_schema()["properties"]
    having = [section for section in sections if setting in properties[section].get("properties", {})]
    if having:
        return f"is not section.key; sections with '{setting}': {', '.join(having)} (e.g. {having[0]}.{setting})"
    return f"is not section.key (e.g. adpa.adpa_weight); sweepable sections: {', '.join(sections)}"


def _check_finite(value: Any, key: str = "") -> None:
    """YAML's .nan and .inf pass every numeric bound of the schema; no setting means them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}': must be a finite number, got {value}")
    if isinstance(value, Mapping):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]")


def validate_config(config: dict, schema: Mapping | None = None) -> dict:
    """Validate in place, filling defaults; raise ConfigError with one line naming the key."""
    schema = dict(schema) if schema is not None else load_schema()
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), e.path))
    if errors:
        raise ConfigError(_describe(errors[0]))
    _check_finite(config)
    run_checks(config, "text", Context(SCHEMA_PATH.parent.parent))
    return config


@key_check(*(f"{STAGES[stage].section}.effective_batch_size" for stage in TRAINING_STAGES), phase="text")
def check_batches(config: Mapping[str, Any], context: Context) -> None:
    """A multiple of per_device_batch_size x processes: the gradient accumulation steps are derived from it."""
    for stage in TRAINING_STAGES:
        gradient_accumulation_steps(config, stage)


@key_check("sweeps", phase="text")
def check_sweeps(config: Mapping[str, Any], context: Context) -> None:
    """Each sweep's setting exists and is student-side, each value passes the schema, and it retrains something."""
    if config["sweeps"]:
        plan_sweeps(config)


def plan_sweeps(config: Mapping, schema: Mapping | None = None) -> dict[str, Sweep]:
    """The config's sweeps, each checked: its setting exists, every value passes the schema, it retrains something."""

    def validate(changed: dict) -> dict:
        return validate_config({**changed, "sweeps": {}}, schema)

    return {name: plan_sweep(config, name, spec, validate, stage_params) for name, spec in config["sweeps"].items()}


def load_config(path: str | os.PathLike | Sequence[str | os.PathLike], overrides: Mapping | None = None) -> dict:
    """Read YAML config files (later ones overlay earlier ones, nested, like several
    `snakemake --configfile`), merge overrides (like --config), validate."""
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(item) for item in path]
    config: dict = {}
    for one in paths:
        _merge(config, read_config_file(one))
    if overrides:
        _merge(config, overrides)
    return validate_config(config)


def read_config_file(path: str | os.PathLike) -> dict:
    """One config file as a mapping; unreadable text, YAML errors and duplicate keys are one ConfigError line."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.load(handle, Loader=StrictLoader)
    except OSError as err:
        raise ConfigError(f"config file '{path}': {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{path}': not UTF-8 text (byte {err.start}: {err.reason})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}': invalid YAML: {_yaml_problem(err)}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        kind = "list" if isinstance(loaded, list) else "single value"
        raise ConfigError(f"config file '{path}': expected a mapping of config keys, got a {kind} ({loaded!r:.40})")
    return loaded


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return f"{where}{error.problem or error.context}"
    return str(error).splitlines()[0]


def check_config_files(paths: Sequence[str | os.PathLike]) -> None:
    """Snakemake reads --configfile itself (a duplicate key silently wins): read them again, strictly."""
    for path in paths:
        read_config_file(path)


def _merge(base: dict, update: Mapping) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def world_size(config: Mapping) -> int:
    launch = config["launch"]
    return launch["num_processes"] * launch["num_machines"]


def gradient_accumulation_steps(config: Mapping, stage: str) -> int:
    section = STAGES[stage].section
    return accumulation_steps(config[section], world_size(config), section)


def produced_paths(config: Mapping) -> set[str]:
    """Paths that rules of the workflow write (so they need not exist before the run)."""
    return {"results/data/sft", "results/data/preference"} if config["datasets"]["generate"] else set()


def accelerate_config_path(config: Mapping, workflow_dir: str | os.PathLike) -> Path:
    """launch.accelerate_config, relative to the workflow folder unless absolute or ~."""
    return Path(workflow_dir, expand_path(config["launch"]["accelerate_config"]))


@key_check(
    "launch.accelerate_config",
    "work_dir",
    "models.base_teacher.path",
    "models.base_student.path",
    "datasets.sft.path",
    "datasets.preference.path",
    "evaluation.alpaca_eval",
    "evaluation.mt_bench",
    phase="files",
)
def check_named_files(config: Mapping[str, Any], context: Context) -> None:
    """Every local path named exists (hub ids: in the preflight); judge question files are read row by row."""
    from adpa.infer.judges import check_judge_inputs

    check_local_sources(config, context.workflow_dir)
    check_judge_inputs(config)


@key_check(
    "datasets.generate.families",
    "datasets.generate.sft_error_rates",
    "datasets.generate.flipped_pair_rates",
    phase="text",
)
def check_task_families(config: Mapping[str, Any], context: Context) -> None:
    """Names task families that exist, each once (families: at least one, or null for all)

    A rate of a family that is not drawn is allowed: an overlay may narrow the families of a config."""
    generate = config["datasets"]["generate"]
    if not generate:
        return
    from adpa.inputs.tasks import FAMILY_NAMES

    families = generate.get("families")
    if families is not None and not families:
        raise ConfigError("config key 'datasets.generate.families': an empty list; name at least one, or null for all")
    for key in ("families", "sft_error_rates", "flipped_pair_rates"):
        names = list(generate.get(key) or [])
        unknown = [name for name in names if name not in FAMILY_NAMES]
        if unknown:
            close = difflib.get_close_matches(unknown[0], FAMILY_NAMES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"families: {', '.join(FAMILY_NAMES)}"
            raise ConfigError(f"config key 'datasets.generate.{key}': unknown task family '{unknown[0]}'; {hint}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"config key 'datasets.generate.{key}': '{repeated[0]}' named twice")


@key_check("chat_template", phase="text")
def check_chat_template(config: Mapping[str, Any], context: Context) -> None:
    """Is a Jinja template that compiles (as transformers compiles chat templates)"""
    template = config.get("chat_template")
    if template is None:
        return
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(
            f"config key 'chat_template': not a Jinja template: line {err.lineno}: {err.message}"
        ) from err


def check_local_sources(config: Mapping, workflow_dir: str | os.PathLike = SCHEMA_PATH.parent.parent) -> None:
    """Every local path the user named exists (hub ids are checked when loaded)."""
    accelerate = accelerate_config_path(config, workflow_dir)
    if config["launch"]["accelerate_config"] != "auto" and not accelerate.is_file():
        raise ConfigError(f"config key 'launch.accelerate_config': no such file: {accelerate}")
    work_dir = Path(workflow_dir, expand_path(config["work_dir"]))
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigError(f"config key 'work_dir': {work_dir} is a file, not a folder")
    produced = produced_paths(config)
    sources = [
        (f"models.{name}.path", config["models"][name].get("path")) for name in ("base_teacher", "base_student")
    ]
    sources += [(f"datasets.{name}.path", config["datasets"][name]["path"]) for name in ("sft", "preference")]
    sources += [(f"evaluation.{name}", config["evaluation"][name]) for name in ("alpaca_eval", "mt_bench")]
    for key, reference in sources:
        if reference is None or reference in produced or not is_local(reference):
            continue
        if not os.path.exists(expand_path(reference)):
            raise ConfigError(f"config key '{key}': no such file or directory: {expand_path(reference)}")


def student_seeds(config: Mapping) -> list[int]:
    """The seeds the student stages run with (teachers always use `seed`)."""
    return list(config["seeds"] or [config["seed"]])


def evaluated_models(config: Mapping) -> list[str]:
    """Every model the results table holds, as paths under results/ (students per seed)."""
    students = [f"seed{seed}/{model}" for seed in student_seeds(config) for model in student_models(config["methods"])]
    return [*TEACHER_MODELS, *students]


def _training(config: Mapping, stage: Stage, common: dict[str, Any]) -> dict[str, Any]:
    """A trained stage: its section's settings, its data and how its model is loaded."""
    teacher, student = config["models"]["base_teacher"], config["models"]["base_student"]
    base = teacher if stage.role == "teacher" else student
    training = {**config[stage.section], **derived_settings(config, stage)}
    params = {**common, "training": training, "trust_remote_code": base["trust_remote_code"]}
    method = METHODS_BY_NAME.get(stage.name)
    if method is not None and method.terms is not None:
        # The loss as data: a changed term reruns exactly the methods that have it (adpa/training/distill.py reads it).
        params["loss"] = {name: list(term) for name, term in method.terms.items()}
        if "advantage" in method.inputs:
            params["advantage_reference"] = advantage_store_reference(method)
    if "sft_data" in stage.reads:
        params.update(dataset=config["datasets"]["sft"], chat_template=config["chat_template"], base_model=base)
    if "preference_data" in stage.reads:
        params["dataset"] = config["datasets"]["preference"]
    if stage.name == "student_sft":
        # The student trains with the base teacher's tokenizer: loaded as the teacher is.
        params["tokenizer"] = {"revision": teacher.get("revision"), "trust_remote_code": teacher["trust_remote_code"]}
    return params


def derived_settings(config: Mapping, stage: Stage) -> dict[str, Any]:
    """The settings another section determines (Stage.derived): e.g. the top-k store's max_length is dckd's."""
    values = {}
    for key, source in stage.derived.items():
        section, name = source.split(".", 1)
        values[key] = config[section][name]
    return values


def _inference(config: Mapping, stage: Stage, advantage_reference: bool) -> dict[str, Any]:
    teacher, student = config["models"]["base_teacher"], config["models"]["base_student"]
    preference = config["datasets"]["preference"]
    params: dict[str, Any] = {"precision": config["precision"]}
    if stage.name == "teacher_topk":
        # The store is aligned to the tokens the distillation stages train on: they share its max_length.
        return {
            **params,
            "k": config["teacher_topk"]["k"],
            **derived_settings(config, stage),
            "dataset": preference,
            "trust_remote_code": teacher["trust_remote_code"],
        }
    if stage.name in ("teacher_generations", "student_generations"):
        source = teacher if stage.name == "teacher_generations" else student
        return {
            **params,
            "max_new_tokens": config[stage.section]["max_new_tokens"],
            "dataset": preference,
            "trust_remote_code": source["trust_remote_code"],
        }
    if stage.name in ("advantage", "chosen_advantage"):
        # On the student's own responses (with the REF teacher or without), or on the chosen ones.
        on_chosen = {"dataset": preference} if stage.name == "chosen_advantage" else {}
        return {
            **params,
            "k": config["teacher_topk"]["k"],
            **derived_settings(config, stage),
            "reference": advantage_reference or stage.name == "chosen_advantage",
            "trust_remote_code": teacher["trust_remote_code"],
            **on_chosen,
        }
    # evaluate: per model family, the teachers' trust_remote_code never extends to the students, nor back.
    return {
        **params,
        "dataset": preference,
        "evaluation": config["evaluation"],
        "base_teacher_revision": teacher.get("revision"),
        "teachers": list(TEACHER_MODELS),
        "trust_remote_code": {"teacher": teacher["trust_remote_code"], "student": student["trust_remote_code"]},
    }


def stage_params(
    config: Mapping, stage: str, seed: int | None = None, *, advantage_reference: bool = True
) -> dict[str, Any]:
    """Exactly the settings a stage's result depends on: its rerun trigger and its input.

    `seed` is the student seed of a per-seed stage (default: the first of `seeds`);
    `advantage_reference`: the advantage store subtracts the REF teacher (false: adpa_no_ref's)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'")
    entry = STAGES[stage]
    teacher, student = config["models"]["base_teacher"], config["models"]["base_student"]
    if entry.kind == "training":
        seed = (student_seeds(config)[0] if seed is None else seed) if entry.per_seed else config["seed"]
        return _training(config, entry, {"seed": seed, "precision": config["precision"]})
    if entry.kind == "inference":
        return _inference(config, entry, advantage_reference)
    if stage == "base_teacher":
        return {"model": teacher, "chat_template": config["chat_template"]}
    if stage == "base_student":
        return {"model": student, "teacher": teacher}
    if stage == "generate_data":
        return {"generate": config["datasets"]["generate"]}
    if stage == "sweep_summary":
        return sweep_summary_params(config)
    return {
        "run_name": config["run_name"],
        "seed": config["seed"],
        "seeds": student_seeds(config),
        "models": evaluated_models(config),
        "split": config["evaluation"]["split"],
    }


def sweep_summary_params(config: Mapping, name: str | None = None) -> dict[str, Any]:
    """The parameters of one sweep's table: its points (the config's value's folder None) and models."""
    sweeps = plan_sweeps(config)
    if name is None and len(sweeps) == 1:
        name = next(iter(sweeps))
    if name not in sweeps:
        raise ConfigError(f"config key 'sweeps': no sweep named {name!r} (sweeps: {', '.join(sweeps) or 'none'})")
    return sweep_table_params(config, sweeps[name])


def sweep_table_params(config: Mapping, sweep: Sweep) -> dict[str, Any]:
    """The sweep_summary stage's parameters for one planned sweep."""
    return {
        "name": sweep.name,
        "setting": sweep.setting,
        "baseline": sweep.baseline,
        "points": [{"value": point.value, "folder": point.folder} for point in sweep.points],
        "models": list(sweep.methods),
        "seeds": student_seeds(config),
        "run_name": config["run_name"],
        "split": config["evaluation"]["split"],
    }


def params_json(params: Mapping) -> str:
    """Canonical JSON: equal settings give byte-equal strings, so Snakemake's params trigger is exact."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))
