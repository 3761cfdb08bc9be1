"""Parameter sweeps (config `sweeps`): which stages each value retrains, and where its outputs go.

A sweep sets one student-side setting (`section.key`) to each of its values. A stage is retrained
at a point when its own parameters change with the setting or it reads a stage that is; every
other input is the main run's output, so a lambda sweep reuses both teachers, student_sft, the
generations and the advantage, and a top-k sweep reruns teacher_topk and only what reads it. The
config's own value is the main run itself. Points are folders named as Snakemake's Paramspace
names them (`key~value`) under results/sweeps/<name>/.

Light imports: Snakemake reads this at parse time.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from adpa.core.errors import ConfigError
from adpa.dag.stages import ADVANTAGE_REFERENCE, METHODS, STAGES

# The student half: the stages a sweep may retrain (teachers and data are a run of their own).
SWEEPABLE = (
    "student_sft",
    "teacher_topk",
    "teacher_generations",
    "student_generations",
    "advantage",
    "chosen_advantage",
    *METHODS,
)
SHARED_INPUTS = {"student_generations": ("student_sft",), "advantage": ("student_generations",)}


def producer(folder: str) -> str:
    """The stage that writes a results/ folder of a registry input ('seed{seed}/advantage_no_ref' -> advantage)."""
    name = folder.rsplit("/", 1)[-1]
    return "advantage" if name in ADVANTAGE_REFERENCE else name


def upstream(stage: str) -> tuple[str, ...]:
    """The sweepable stages whose outputs a stage reads."""
    if stage in SHARED_INPUTS:
        return SHARED_INPUTS[stage]
    return tuple(producer(folder) for folder in STAGES[stage].inputs.values())


@dataclass(frozen=True)
class SweepPoint:
    value: Any
    folder: str | None  # under results/; None: the config's own value, i.e. the main run


@dataclass(frozen=True)
class Sweep:
    name: str
    setting: str
    baseline: Any
    points: tuple[SweepPoint, ...]  # in ascending value order, the baseline among them
    retrained: frozenset[str]  # the stages trained again at each point
    methods: tuple[str, ...]  # the student methods tabulated
    # Each swept point's config (the setting at its value, validated), by folder name (`key~value`).
    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> str:
        return self.setting.split(".", 1)[1]

    def point(self, folder_name: str) -> SweepPoint:
        """The point of a folder name (`key~value`)."""
        for point in self.points:
            if point.folder is not None and point.folder.rsplit("/", 1)[-1] == folder_name:
                return point
        raise KeyError(f"sweep '{self.name}' has no point '{folder_name}'")

    @property
    def swept(self) -> tuple[SweepPoint, ...]:
        """The points with folders of their own (every value but the config's)."""
        return tuple(point for point in self.points if point.folder is not None)


def value_text(value: Any) -> str:
    """A value as its folder name shows it: YAML's spelling (0.5, 3, true)."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def with_setting(config: Mapping[str, Any], setting: str, value: Any) -> dict[str, Any]:
    section, key = setting.split(".", 1)
    changed = copy.deepcopy(dict(config))
    changed[section] = {**changed[section], key: value}
    return changed


def _typed_like(value: Any, baseline: Any) -> Any:
    """Snakemake's nested --config values arrive as text ("0.5"): read them as the setting's own type."""
    if isinstance(value, str) and not isinstance(baseline, str):
        parsed = yaml.safe_load(value)
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return value


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def plan_sweep(
    config: Mapping[str, Any],
    name: str,
    spec: Mapping[str, Any],
    validate: Callable[[dict], dict],
    params_of: Callable[[Mapping[str, Any], str], Any],
) -> Sweep:
    """One sweep of a validated config: its points and the stages it retrains.

    `validate` checks a config with the setting changed (the schema's bounds); `params_of(config,
    stage)` gives a stage's parameters, whose change marks the stage as retrained."""
    where = f"config key 'sweeps.{name}"
    setting = spec["setting"]
    section, key = setting.split(".", 1)
    sections = {STAGES[stage].section for stage in SWEEPABLE} - {None}
    if section not in sections:
        raise ConfigError(
            f"{where}.setting': {setting} is not a student-side setting (sweepable sections: "
            f"{', '.join(sorted(sections))}); teacher and data settings make a run of their own"
        )
    if key not in config.get(section, {}):
        raise ConfigError(f"{where}.setting': section '{section}' has no setting '{key}'")
    baseline = config[section][key]
    given = [_typed_like(value, baseline) for value in spec["values"]]
    if all(value == baseline for value in given):
        raise ConfigError(
            f"{where}.values': only the config's own {setting} = {baseline!r}, the main run; name another value"
        )
    values = sorted({*given, baseline}, key=_sort_key)
    configs = {}
    for index, value in enumerate(given):
        try:
            configs[value] = validate(with_setting(config, setting, value))
        except ConfigError as error:
            raise ConfigError(f"{where}.values[{index}]': {value!r}: {error}") from error
    changed = {
        stage
        for stage in SWEEPABLE
        if any(params_of(point, stage) != params_of(config, stage) for point in configs.values())
    }
    affected = set(changed)
    for _ in SWEEPABLE:  # the closure over what reads a changed stage
        affected |= {stage for stage in SWEEPABLE if set(upstream(stage)) & affected}
    candidates = [method for method in config["methods"] if method in affected]
    methods = list(spec["methods"] or candidates)
    for method in methods:
        if method not in config["methods"]:
            raise ConfigError(f"{where}.methods': {method} is not in `methods` (its config value is the main run's)")
        if method not in affected:
            raise ConfigError(f"{where}.methods': {setting} changes nothing {method} reads")
    if not methods:
        raise ConfigError(f"{where}.setting': {setting} changes no stage of the configured methods")
    retrained: set[str] = set()
    pending = list(methods)
    while pending:
        stage = pending.pop()
        if stage in affected and stage not in retrained:
            retrained.add(stage)
            pending.extend(upstream(stage))
    points = tuple(
        SweepPoint(value, None if value == baseline else f"sweeps/{name}/{key}~{value_text(value)}")
        for value in values
    )
    ordered = tuple(method for method in METHODS if method in methods)
    by_folder = {point.folder.rsplit("/", 1)[-1]: configs[point.value] for point in points if point.folder}
    return Sweep(name, setting, baseline, points, frozenset(retrained), ordered, by_folder)
