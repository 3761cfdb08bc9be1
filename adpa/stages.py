"""The one registry of stages: everything else (stage parameters, the CLI, launch groups, the
preflight, code hashes, the rules of the student methods) derives from it.

Light on imports: Snakemake reads it at parse time, and no stage's code hash includes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

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

    @property
    def module(self) -> str:
        return self.runner.split(":", 1)[0]

    @property
    def function(self) -> str:
        return self.runner.split(":", 1)[1]


SEED = "seed{seed}"
FROM_SFT = {"model": f"{SEED}/student_sft"}
TOP_K = {"topk": "teacher_topk"}
OWN_ADVANTAGE = {"generations": f"{SEED}/student_generations", "advantage": f"{SEED}/advantage"}
# The advantage stage's two stores, by folder: log pi_dpo - log pi_ref, or log pi_dpo alone (the
# paper's ablation without the REF teacher). The folder name is the stage's setting.
ADVANTAGE_REFERENCE = {"advantage": True, "advantage_no_ref": False}

REGISTRY: tuple[Stage, ...] = (
    Stage(
        "generate_data",
        "cpu",
        "adpa.datagen:run_generate_data",
        "write the generated task family in both dataset forms",
        section="datasets",
        options=("sft_output", "preference_output"),
    ),
    Stage(
        "base_teacher",
        "cpu",
        "adpa.models:run_base_teacher",
        "materialize a GGUF-shipped base model as safetensors",
        options=("output",),
        reads=("base_teacher",),
        role="teacher",
    ),
    Stage(
        "base_student",
        "cpu",
        "adpa.models:run_base_student",
        "cut a student from the base teacher's layers",
        options=("teacher", "output"),
        reads=("base_teacher",),
    ),
    Stage(
        "ref_teacher",
        "training",
        "adpa.sft:run_sft",
        "SFT of the base teacher (TRL SFTTrainer)",
        section="ref_teacher",
        reads=("base_teacher", "sft_data"),
        role="teacher",
    ),
    Stage(
        "dpo_teacher",
        "training",
        "adpa.dpo:run_dpo",
        "DPO of the REF teacher, reference = REF teacher (TRL DPOTrainer)",
        section="dpo_teacher",
        reads=("preference_data",),
        role="teacher",
    ),
    Stage(
        "student_sft",
        "training",
        "adpa.sft:run_sft",
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
        "adpa.inference:run_teacher_topk",
        "the DPO teacher's top-k log-probs on chosen and rejected",
        section="teacher_topk",
        options=("model", "output", "batch_size"),
        reads=("preference_data",),
    ),
    Stage(
        "teacher_generations",
        "inference",
        "adpa.generation:run_generations",
        "the DPO teacher's greedy responses to the preference prompts (seq_kd's data)",
        section="teacher_generations",
        options=("model", "output", "batch_size"),
        reads=("preference_data",),
    ),
    Stage(
        "student_generations",
        "inference",
        "adpa.generation:run_generations",
        "the student's greedy responses to the preference prompts",
        per_seed=True,
        section="student_generations",
        options=("model", "output", "batch_size"),
        reads=("preference_data",),
    ),
    Stage(
        "advantage",
        "inference",
        "adpa.inference:run_advantage",
        "DPO-vs-REF teacher advantage on the student's own responses (or the DPO teacher's log-probs alone)",
        per_seed=True,
        options=("model", "ref_model", "generations", "output", "batch_size"),
    ),
    # Student methods (each from student_sft unless said otherwise).
    Stage(
        "student_dpo",
        "training",
        "adpa.dpo:run_dpo",
        "baseline: DPO of the student, reference = student_sft",
        per_seed=True,
        section="student_dpo",
        reads=("preference_data",),
        role="student",
        method=True,
        inputs=FROM_SFT,
    ),
    Stage(
        "simpo",
        "training",
        "adpa.simpo:run_simpo",
        "baseline: SimPO of the student (reference-free; TRL CPOTrainer)",
        per_seed=True,
        section="simpo",
        reads=("preference_data",),
        role="student",
        method=True,
        inputs=FROM_SFT,
    ),
    Stage(
        "chosen_sft",
        "training",
        "adpa.distill:run_distillation",
        "control: NLL on the chosen responses alone, the term every distillation method shares",
        per_seed=True,
        section="chosen_sft",
        reads=("preference_data",),
        role="student",
        method=True,
        inputs=FROM_SFT,
    ),
    Stage(
        "vanilla_kd",
        "training",
        "adpa.distill:run_distillation",
        "baseline: NLL + forward KL to the DPO teacher's top-k on the chosen response",
        per_seed=True,
        section="vanilla_kd",
        options=("model", "topk", "output"),
        reads=("preference_data",),
        role="student",
        method=True,
        inputs={**FROM_SFT, **TOP_K},
    ),
    Stage(
        "seq_kd",
        "training",
        "adpa.sft:run_sft",
        "baseline: SFT of the student on the DPO teacher's greedy responses",
        per_seed=True,
        section="seq_kd",
        options=("model", "generations", "output"),
        role="student",
        method=True,
        inputs={**FROM_SFT, "generations": "teacher_generations"},
    ),
    Stage(
        "dckd",
        "training",
        "adpa.distill:run_distillation",
        "DCKD: distillation from the teacher's top-k on chosen and rejected",
        per_seed=True,
        section="dckd",
        options=("model", "topk", "output"),
        reads=("preference_data",),
        role="student",
        method=True,
        inputs={**FROM_SFT, **TOP_K},
    ),
    Stage(
        "adpa",
        "training",
        "adpa.distill:run_distillation",
        "ADPA from student_sft",
        per_seed=True,
        section="adpa",
        options=("model", "generations", "advantage", "output"),
        reads=("preference_data",),
        role="student",
        method=True,
        inputs={**FROM_SFT, **OWN_ADVANTAGE},
    ),
    Stage(
        "adpa_plus",
        "training",
        "adpa.distill:run_distillation",
        "ADPA+: ADPA from the DCKD student",
        per_seed=True,
        section="adpa",
        options=("model", "generations", "advantage", "output"),
        reads=("preference_data",),
        role="student",
        method=True,
        inputs={"model": f"{SEED}/dckd", **OWN_ADVANTAGE},
    ),
    Stage(
        "adpa_no_ref",
        "training",
        "adpa.distill:run_distillation",
        "ablation: ADPA whose advantage is the DPO teacher's log-prob alone (no REF teacher)",
        per_seed=True,
        section="adpa",
        options=("model", "generations", "advantage", "output"),
        reads=("preference_data",),
        role="student",
        method=True,
        inputs={**FROM_SFT, **OWN_ADVANTAGE, "advantage": f"{SEED}/advantage_no_ref"},
    ),
    Stage(
        "evaluate",
        "inference",
        "adpa.evaluate:run_evaluate",
        "held-out accuracy, preference accuracy and margin of one model (and judge inputs)",
        section="evaluation",
        options=("model", "name", "run_name", "output", "batch_size"),
        reads=("preference_data",),
    ),
    Stage(
        "summary",
        "cpu",
        "adpa.summary:run_summary",
        "the results table (CSV, Markdown) and plots over every model",
        section="evaluation",
        options=("results", "csv", "markdown", "metrics_plot", "loss_plot", "paired_csv"),
    ),
    Stage(
        "sweep_summary",
        "cpu",
        "adpa.sweep_summary:run_sweep_summary",
        "one sweep's table (CSV, Markdown) and plot: each value's metrics against the config's own",
        options=("results", "csv", "markdown", "plot"),
    ),
)

STAGES: dict[str, Stage] = {stage.name: stage for stage in REGISTRY}
METHODS = tuple(stage.name for stage in REGISTRY if stage.method)
TEACHER_MODELS = tuple(stage.name for stage in REGISTRY if stage.role == "teacher")


def of_kind(kind: Kind) -> tuple[str, ...]:
    return tuple(stage.name for stage in REGISTRY if stage.kind == kind)


# The config key of a stage's max_length where it is not in the stage's own section: the top-k store
# is cut at dckd's length (vanilla_kd reads it too), the advantage store at adpa's.
MAX_LENGTH_KEYS = {"vanilla_kd": "dckd.max_length", "teacher_topk": "dckd.max_length", "advantage": "adpa.max_length"}


def max_length_key(stage: str) -> str | None:
    """'section.max_length' of the stage's token limit (None: a stage without one)."""
    if stage in MAX_LENGTH_KEYS:
        return MAX_LENGTH_KEYS[stage]
    entry = STAGES[stage]
    return f"{entry.section}.max_length" if entry.kind == "training" else None


def reading(source: Source) -> tuple[str, ...]:
    """The stages that read a configured source."""
    return tuple(stage.name for stage in REGISTRY if source in stage.reads)


def student_models(methods: tuple[str, ...] | list[str]) -> list[str]:
    """The student models of the results table, in registry order: student_sft and the chosen methods."""
    return [
        stage.name for stage in REGISTRY if stage.role == "student" and (not stage.method or stage.name in methods)
    ]
