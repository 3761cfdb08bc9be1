"""The one registry of stages: everything else (stage parameters, the CLI, launch groups, the
preflight, code hashes, the rules of the student methods) derives from it.

Light on imports: Snakemake reads it at parse time, and no stage's code hash includes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from adpa.dag.methods import ADVANTAGE_REFERENCE, METHOD_ENTRIES, Method

__all__ = ["ADVANTAGE_REFERENCE", "METHODS", "REGISTRY", "STAGES", "Stage"]

Kind = Literal["training", "inference", "cpu"]
# Sources outside results/ a stage can read; the preflight checks exactly what the planned stages read.
Source = Literal["base_teacher", "base_student", "sft_data", "preference_data"]


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Kind  # its launch group: accelerate launch, one inference process, or a CPU job
    runner: str  # "module:function" that runs it
    help: str
    per_seed: bool = False  # once per student seed, into results/seed<N>/
    section: str | None = None  # config section of its settings
    options: tuple[str, ...] = ("model", "output")  # CLI inputs (adpa/cli.py OPTIONS)
    reads: tuple[Source, ...] = ()
    role: Literal["teacher", "student"] | None = None  # a model in the results table
    method: bool = False  # a student method, selected by the config's `methods`
    # Student methods: the rule's inputs (CLI option -> folder under results/, {seed} for per-seed ones).
    inputs: Mapping[str, str] = field(default_factory=dict)
    # Settings another section determines: setting -> "section.key" (the top-k store's max_length is dckd's).
    derived: Mapping[str, str] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return self.runner.split(":", 1)[0]

    @property
    def function(self) -> str:
        return self.runner.split(":", 1)[1]


def method_stage(method: Method) -> Stage:
    """A student method's stage: trained once per seed, from its entry."""
    return Stage(
        method.name,
        "training",
        method.runner,
        method.help,
        per_seed=True,
        section=method.settings_section,
        options=method.options,
        reads=("preference_data",) if method.reads_preference else (),
        role="student",
        method=True,
        inputs=method.inputs,
        derived=method.derived,
    )


REGISTRY: tuple[Stage, ...] = (
    Stage(
        "generate_data",
        "cpu",
        "adpa.inputs.datagen:run_generate_data",
        "write the generated task family in both dataset forms",
        section="datasets",
        options=("sft_output", "preference_output"),
    ),
    Stage(
        "base_teacher",
        "cpu",
        "adpa.modeling.models:run_base_teacher",
        "materialize a GGUF-shipped base model as safetensors",
        options=("output",),
        reads=("base_teacher",),
        role="teacher",
    ),
    Stage(
        "base_student",
        "cpu",
        "adpa.modeling.models:run_base_student",
        "cut a student from the base teacher's layers",
        options=("teacher", "output"),
        reads=("base_teacher",),
    ),
    Stage(
        "ref_teacher",
        "training",
        "adpa.training.sft:run_sft",
        "SFT of the base teacher (TRL SFTTrainer)",
        section="ref_teacher",
        reads=("base_teacher", "sft_data"),
        role="teacher",
    ),
    Stage(
        "dpo_teacher",
        "training",
        "adpa.training.dpo:run_dpo",
        "DPO of the REF teacher, reference = REF teacher (TRL DPOTrainer)",
        section="dpo_teacher",
        reads=("preference_data",),
        role="teacher",
    ),
    Stage(
        "student_sft",
        "training",
        "adpa.training.sft:run_sft",
        "SFT of the base student with the teacher's tokenizer",
        per_seed=True,
        section="student_sft",
        options=("model", "tokenizer", "output"),
        reads=("base_teacher", "base_student", "sft_data"),
        role="student",
    ),
    Stage(
        "teacher_topk",
        "inference",
        "adpa.infer.inference:run_teacher_topk",
        "the DPO teacher's top-k log-probs on chosen and rejected",
        section="teacher_topk",
        options=("model", "output", "batch_size"),
        reads=("preference_data",),
        derived={"max_length": "dckd.max_length"},  # the distillation stages that read it train at dckd's length
    ),
    Stage(
        "teacher_generations",
        "inference",
        "adpa.infer.generation:run_generations",
        "the DPO teacher's greedy responses to the preference prompts (seq_kd's data)",
        section="teacher_generations",
        options=("model", "output", "batch_size"),
        reads=("preference_data",),
    ),
    Stage(
        "student_generations",
        "inference",
        "adpa.infer.generation:run_generations",
        "the student's greedy responses to the preference prompts",
        per_seed=True,
        section="student_generations",
        options=("model", "output", "batch_size"),
        reads=("preference_data",),
    ),
    Stage(
        "advantage",
        "inference",
        "adpa.infer.inference:run_advantage",
        "DPO-vs-REF teacher advantage on the student's own responses (or the DPO teacher's log-probs alone)",
        per_seed=True,
        options=("model", "ref_model", "generations", "output", "batch_size"),
        derived={"max_length": "adpa.max_length"},
    ),
    Stage(
        "chosen_advantage",
        "inference",
        "adpa.infer.inference:run_advantage",
        "DPO-vs-REF teacher advantage on the preference set's chosen responses (adpa_chosen's store)",
        options=("model", "ref_model", "output", "batch_size"),
        reads=("preference_data",),
        derived={"max_length": "adpa.max_length"},
    ),
    # The student methods, one entry each in adpa/dag/methods.py.
    *(method_stage(method) for method in METHOD_ENTRIES),
    Stage(
        "evaluate",
        "inference",
        "adpa.infer.evaluate:run_evaluate",
        "held-out accuracy, preference accuracy and margin of one model (and judge inputs)",
        section="evaluation",
        options=("model", "name", "run_name", "output", "batch_size"),
        reads=("preference_data",),
    ),
    Stage(
        "summary",
        "cpu",
        "adpa.report.summary:run_summary",
        "the results table (CSV, Markdown) and plots over every model",
        section="evaluation",
        options=("results", "csv", "markdown", "metrics_plot", "loss_plot", "paired_csv"),
    ),
    Stage(
        "sweep_summary",
        "cpu",
        "adpa.report.sweep_summary:run_sweep_summary",
        "one sweep's table (CSV, Markdown) and plot: each value's metrics against the config's own",
        options=("results", "csv", "markdown", "plot"),
    ),
)

STAGES: dict[str, Stage] = {stage.name: stage for stage in REGISTRY}
METHODS = tuple(stage.name for stage in REGISTRY if stage.method)
TEACHER_MODELS = tuple(stage.name for stage in REGISTRY if stage.role == "teacher")


def of_kind(kind: Kind) -> tuple[str, ...]:
    return tuple(stage.name for stage in REGISTRY if stage.kind == kind)


def max_length_key(stage: str) -> str | None:
    """'section.max_length' of the stage's token limit (None: a stage without one)."""
    entry = STAGES[stage]
    if "max_length" in entry.derived:
        return entry.derived["max_length"]
    return f"{entry.section}.max_length" if entry.kind == "training" else None


def reading(source: Source) -> tuple[str, ...]:
    """The stages that read a configured source."""
    return tuple(stage.name for stage in REGISTRY if source in stage.reads)


def student_models(methods: tuple[str, ...] | list[str]) -> list[str]:
    """The student models of the results table, in registry order: student_sft and the chosen methods."""
    return [
        stage.name for stage in REGISTRY if stage.role == "student" and (not stage.method or stage.name in methods)
    ]
