"""What the schema cannot say about a config key, checked once, under the key's path.

config/schema.yaml declares each key's type, bounds and default. A key whose value can be wrong in
a way the schema cannot see (a batch that does not divide, held-out rows the task families cannot
supply, LoRA modules the teacher lacks) gets a check registered here under its path, with
`@key_check("section.key", ...)`, in the module that knows the key's meaning. `python -m adpa check`
and the workflow run the same registry, in three phases:

- "text": the config alone, whenever a config is validated (adpa.workflow.config.validate_config);
- "files": the local files it names, when the workflow reads its config (Snakemake's parse) and
  in `check`;
- "preflight": what needs data or a model (row counts, tokenizers, module names, disk), before the
  first job; only the checks of the stages about to run.

Each check raises one ConfigError line naming its key. config/README.md shows, next to each key,
the checks registered for it (adpa/workflow/config_docs.py); tests/test_bad_inputs.py holds a bad value and
its exact line for every key here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Phase = Literal["text", "files", "preflight"]
PHASES: tuple[Phase, ...] = ("text", "files", "preflight")


@dataclass(frozen=True)
class Plan:
    """The jobs about to run: their rules, and the models whose evaluate job runs."""

    rules: frozenset[str] = frozenset()
    evaluated: frozenset[str] = frozenset()
    everything: bool = False

    @classmethod
    def all(cls) -> Plan:
        return cls(everything=True)

    @classmethod
    def of_jobs(cls, jobs: Iterable[tuple[str, Mapping[str, str]]]) -> Plan:
        """From (rule name, wildcards) of each job Snakemake is about to run."""
        # A sweep point's job (`<stage>_sweep`) reads what its stage reads.
        jobs = [(rule.removesuffix("_sweep"), wildcards) for rule, wildcards in jobs]
        evaluated = {wildcards["model"] for rule, wildcards in jobs if rule == "evaluate" and "model" in wildcards}
        return cls(frozenset(rule for rule, _ in jobs), frozenset(evaluated))

    def runs(self, *rules: str) -> bool:
        return self.everything or not self.rules.isdisjoint(rules)

    def evaluates(self, model: str) -> bool:
        return self.everything or model in self.evaluated


@dataclass
class Context:
    """What a check may need besides the config; checks of one run share it (a dataset read once)."""

    workflow_dir: Path
    plan: Plan = field(default_factory=Plan.all)
    local_jobs: bool = True  # training jobs run on this machine (not placed by Slurm)
    loaded: dict[str, Any] = field(default_factory=dict)  # training splits read so far, by dataset name
    warnings: list[str] = field(default_factory=list)


CheckFunction = Callable[[Mapping[str, Any], Context], None]


@dataclass(frozen=True)
class KeyCheck:
    keys: tuple[str, ...]  # the keys it judges, as paths ("dpo_teacher.peft.target_modules")
    phase: Phase
    function: CheckFunction
    stages: tuple[str, ...]  # preflight: runs when a job of one of these runs (empty: always)

    @property
    def summary(self) -> str:
        """The first line of the check's docstring: what config/README.md says of it."""
        return (self.function.__doc__ or self.function.__name__).strip().splitlines()[0].rstrip(".")

    def applies(self, plan: Plan) -> bool:
        return not self.stages or plan.runs(*self.stages)


REGISTRY: list[KeyCheck] = []


def key_check(*keys: str, phase: Phase, stages: Iterable[str] = ()) -> Callable[[CheckFunction], CheckFunction]:
    """Register the decorated `function(config, context)` as the check of `keys`; they run in the
    order registered (cheap ones first)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")

    def register(function: CheckFunction) -> CheckFunction:
        REGISTRY.append(KeyCheck(tuple(keys), phase, function, tuple(stages)))
        return function

    return register


def registered() -> list[KeyCheck]:
    """Every check, with the modules that register them imported."""
    import adpa.workflow.preflight  # noqa: F401  (imports every module that registers checks)

    return list(REGISTRY)


def run_checks(config: Mapping[str, Any], phase: Phase, context: Context) -> None:
    """Every check of `phase` that the planned jobs need; the first problem is raised as one line."""
    for check in registered():
        if check.phase == phase and check.applies(context.plan):
            check.function(config, context)


def check_files(config: Mapping[str, Any], workflow_dir: str | os.PathLike) -> None:
    """The "files" phase: the local files a validated config names."""
    run_checks(config, "files", Context(Path(workflow_dir)))


def checks_of(key: str) -> list[KeyCheck]:
    return [check for check in registered() if key in check.keys]
