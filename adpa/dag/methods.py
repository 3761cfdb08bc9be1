"""The student methods, one entry each: everything else about a method derives from its entry.

An entry names what the method runs (a TRL trainer's stage function, or a distillation loss as a
table of terms run by adpa/training/distill.py), the results it reads (its `inputs`: CLI option -> folder
under results/), its settings (the schema section: the training settings plus its own, with
defaults; or another method's section it shares), settings another one determines (`derived`),
the comparisons it appears in in the results table, its model card's tags and its row of the
README's stage table. From the entries come: the stage registry's method stages and their rules
(adpa/dag/stages.py, rules/students.smk), the schema's method sections, `methods` enums and resource
keys (adpa/workflow/config.py load_schema), the paired comparisons and the attribution rows
(adpa/report/summary.py), the cards' tags (adpa/report/model_card.py), and tests/test_methods.py checks the
README row.

Light imports only: Snakemake reads it at parse time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from adpa.dag.objectives import ADPA, DCKD, NLL_ON_CHOSEN, VANILLA_KD, Term, Terms

SEED = "seed{seed}"
FROM_SFT = {"model": f"{SEED}/student_sft"}
TOP_K = {"topk": "teacher_topk"}
OWN_ADVANTAGE = {"generations": f"{SEED}/student_generations", "advantage": f"{SEED}/advantage"}
# The advantage stage's two stores, by folder: log pi_dpo - log pi_ref, or log pi_dpo alone (the
# paper's ablation without the REF teacher). The folder name is the stage's setting.
ADVANTAGE_REFERENCE = {"advantage": True, "advantage_no_ref": False}
# Every advantage store a method can read, by folder: whether it subtracts the REF teacher. The
# chosen_advantage stage's is on the preference set's chosen responses (shared by every seed).
ADVANTAGE_STORES = {**ADVANTAGE_REFERENCE, "chosen_advantage": True}
# The model every student method is compared with first, and the control every distillation method
# is compared with: NLL on the chosen responses alone, the term they all share.
BASELINE = "student_sft"
CONTROL = "chosen_sft"

Kind = Literal["baseline", "control", "method", "ablation"]
# Order of the "- student_sft" comparisons: the baselines, the control, then the rest.
KIND_ORDER: tuple[Kind, ...] = ("baseline", "control", "method", "ablation")
DISTILL = "adpa.training.distill:run_distillation"
WEIGHT = {"type": "number", "minimum": 0}


class Comparison(NamedTuple):
    """A paired difference of the results table: this method minus `baseline` on the same rows and seeds.
    `ingredient`: what the method adds to the baseline, a row of the attribution table."""

    baseline: str
    ingredient: str | None = None


@dataclass(frozen=True)
class Method:
    name: str
    kind: Kind
    help: str  # one line: the CLI's and the registry's
    docs: str  # its row of the README's stage table ("what it does")
    tags: tuple[str, ...]  # the model card's tags
    runner: str = DISTILL  # "module:function" that trains it
    terms: Terms | None = None  # a distillation loss (runner adpa.training.distill): its terms
    inputs: Mapping[str, str] = field(default_factory=lambda: dict(FROM_SFT))  # CLI option -> results/ folder
    reads_preference: bool = True
    section: str | None = None  # None: its own section, `name`; else the method whose settings it shares
    description: str = ""  # its own section's description in the schema
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # schema properties beyond training's
    derived: Mapping[str, str] = field(default_factory=dict)  # setting -> the "section.key" that determines it
    comparisons: tuple[Comparison, ...] = ()  # besides "- student_sft" and, for distillation, "- chosen_sft"
    against_baselines: bool = False  # compared with every baseline too (the paper's headline method)

    @property
    def settings_section(self) -> str:
        return self.section or self.name

    @property
    def options(self) -> tuple[str, ...]:
        """Its CLI options: its inputs, then the output."""
        return (*self.inputs, "output")

    @property
    def distillation(self) -> bool:
        """A distillation method (a loss against a teacher signal), compared with the control."""
        return self.terms is not None and self.kind != "control"


METHOD_ENTRIES: tuple[Method, ...] = (
    Method(
        "student_dpo",
        "baseline",
        "baseline: DPO of the student, reference = student_sft",
        "baseline: TRL `DPOTrainer` on the student, reference = student_sft",
        ("dpo",),
        runner="adpa.training.dpo:run_dpo",
        description="Baseline DPO of the student, reference = student_sft.",
        settings={
            "beta": {"type": "number", "exclusiveMinimum": 0, "default": 0.01},
            "loss_type": {"type": "string", "enum": ["sigmoid", "ipo", "hinge"], "default": "sigmoid"},
        },
    ),
    Method(
        "simpo",
        "baseline",
        "baseline: SimPO of the student (reference-free; TRL CPOTrainer)",
        "baseline: SimPO of student_sft on the preference pairs, TRL `CPOTrainer` with"
        ' `loss_type="simpo"`, reference-free',
        ("simpo",),
        runner="adpa.training.simpo:run_simpo",
        description=(
            "Baseline: SimPO (reference-free, length-normalized margin loss; TRL's CPOTrainer with "
            "loss_type simpo and no NLL term) of the student, init student_sft."
        ),
        settings={
            "beta": {"type": "number", "exclusiveMinimum": 0, "default": 2.0, "description": "SimPO's reward scale."},
            "gamma": {
                "type": "number",
                "minimum": 0,
                "default": 0.5,
                "description": "SimPO's target reward margin (simpo_gamma).",
            },
        },
    ),
    Method(
        "dpkd",
        "baseline",
        "baseline: DPKD, DPO of the student on the DPO teacher's answers over its own, reference = the DPO teacher",
        "baseline (the paper's): direct preference knowledge distillation as DistiLLM-2's `dpkd` loss, TRL"
        " `DPOTrainer` from student_sft with chosen = the DPO teacher's greedy answer (`teacher_generations`),"
        " rejected = the student's own (`student_generations`), reference = the DPO teacher, per-token mean"
        " log-probs (`loss_type: sigmoid_norm`)",
        ("dpo", "distillation", "dpkd"),
        runner="adpa.training.dpo:run_dpkd",
        inputs={
            **FROM_SFT,
            "dpo_teacher": "dpo_teacher",
            "generations": "teacher_generations",
            "own_generations": f"{SEED}/student_generations",
        },
        reads_preference=False,
        description=(
            "Baseline: DPKD (direct preference knowledge distillation; DistiLLM-2's dpkd loss), DPO of the "
            "student (init student_sft) preferring the DPO teacher's greedy answers to its own, against the "
            "DPO teacher as the frozen reference."
        ),
        settings={
            "beta": {"type": "number", "exclusiveMinimum": 0, "default": 0.1},
            "loss_type": {
                "type": "string",
                "enum": ["sigmoid_norm", "sigmoid"],
                "default": "sigmoid_norm",
                "description": "sigmoid_norm: per-token mean log-probs (DistiLLM-2); sigmoid: sums (DPO's).",
            },
        },
    ),
    Method(
        "gkd",
        "baseline",
        "baseline: on-policy distillation, TRL GKDTrainer (generalized JSD to the DPO teacher, online)",
        "baseline (the field's trainers): on-policy distillation with TRL's `GKDTrainer` from student_sft:"
        " with probability `gkd.lmbda` a batch's answers are the student's own samples, else the chosen"
        " answers; generalized JSD (`gkd.beta`) to the DPO teacher, run online on them",
        ("distillation", "gkd", "on-policy"),
        runner="adpa.training.gkd:run_gkd",
        inputs={**FROM_SFT, "dpo_teacher": "dpo_teacher"},
        description=(
            "Baseline: on-policy distillation (GKD, Agarwal et al. 2024) through TRL's GKDTrainer, init "
            "student_sft, the DPO teacher online; TRL's defaults for lmbda, beta and temperature."
        ),
        settings={
            "lmbda": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "default": 0.5,
                "description": "Fraction of batches answered by the student's own samples (else the chosen answers).",
            },
            "beta": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "default": 0.5,
                "description": "Generalized JSD interpolation: 0 forward KL(teacher || student), 1 reverse KL.",
            },
            "temperature": {
                "type": "number",
                "exclusiveMinimum": 0,
                "default": 0.9,
                "description": "Sampling temperature of the student's answers.",
            },
            "max_new_tokens": {
                "type": "integer",
                "minimum": 1,
                "default": 128,
                "description": "Sampled answer length.",
            },
        },
    ),
    Method(
        "chosen_sft",
        "control",
        "control: NLL on the chosen responses alone, the term every distillation method shares",
        "the control: student_sft trained further with NLL(y_w) alone, the term DCKD, vanilla KD, ADPA"
        " and ADPA+ share (give it their data, steps and learning rate)",
        ("sft", "distillation-control"),
        terms=NLL_ON_CHOSEN,
        description=(
            "Control: student_sft trained further with NLL on the preference set's chosen responses "
            "alone, the term DCKD, vanilla KD, ADPA and ADPA+ share. Give it the distillation "
            "methods' data, steps and learning rate to measure what their other terms add."
        ),
        comparisons=(Comparison(BASELINE, "clean answers"),),
    ),
    Method(
        "adpa_chosen",
        "control",
        "control: ADPA's advantage term read on the chosen answers instead of the student's own",
        "the control of ADPA's on-policy states: NLL(y_w) − λ·Σ_a π_θ(a\\|s_t)·A(s_t,a) at the states of the"
        " chosen answers y_w (`chosen_advantage`) instead of the student's own, settings of `adpa`",
        ("distillation", "adpa", "distillation-control"),
        terms={
            "nll": Term("nll", "chosen", "nll_weight"),
            "chosen_advantage": Term("advantage", "chosen", "adpa_weight", -1.0),
        },
        inputs={**FROM_SFT, "advantage": "chosen_advantage"},
        section="adpa",
        comparisons=(Comparison(CONTROL, "the advantage on the chosen answers"),),
    ),
    Method(
        "vanilla_kd",
        "baseline",
        "baseline: NLL + forward KL to the DPO teacher's top-k on the chosen response",
        "baseline: from student_sft, NLL(y_w) + forward KL to the DPO teacher's stored top-k on y_w;"
        " no rejected term, no advantage",
        ("distillation", "kd"),
        terms=VANILLA_KD,
        inputs={**FROM_SFT, **TOP_K},
        description=(
            "Baseline: NLL plus the forward KL to the DPO teacher's stored top-k, on the chosen "
            "response only (no rejected term, no advantage; init student_sft)."
        ),
        settings={
            "nll_weight": {**WEIGHT, "default": 1.0},
            "kl_weight": {**WEIGHT, "default": 0.1},
        },
        # It reads the top-k store, cut at dckd's length.
        derived={"max_length": "dckd.max_length"},
        comparisons=(Comparison(CONTROL, "the teacher's distribution on chosen"),),
    ),
    Method(
        "seq_kd",
        "baseline",
        "baseline: SFT of the student on the DPO teacher's greedy responses",
        "baseline: SFT of student_sft on the DPO teacher's greedy responses (`teacher_generations`)",
        ("sft", "distillation", "seq-kd"),
        runner="adpa.training.sft:run_sft",
        inputs={**FROM_SFT, "generations": "teacher_generations"},
        reads_preference=False,
        description=(
            "Baseline: sequence-level KD, SFT of the student (init student_sft) on the DPO teacher's "
            "greedy responses to the preference prompts (loss on the response only)."
        ),
        settings={"packing": {"type": "boolean", "default": False}},
    ),
    Method(
        "dckd",
        "method",
        "DCKD: distillation from the teacher's top-k on chosen and rejected",
        "from student_sft: NLL(y_w) + w_c·KL(y_w) + w_r·KL(y_l) against the teacher's top-k (with the"
        " remaining-mass bin); w_c = w_r = 0.1 in every shipped config",
        ("distillation", "dckd"),
        terms=DCKD,
        inputs={**FROM_SFT, **TOP_K},
        description="Distillation from the DPO teacher's top-k on chosen and rejected (init student_sft).",
        settings={
            "nll_weight": {**WEIGHT, "default": 1.0},
            "chosen_kl_weight": {**WEIGHT, "default": 0.1},
            "rejected_kl_weight": {**WEIGHT, "default": 0.1},
        },
        comparisons=(Comparison("vanilla_kd", "the rejected side"),),
    ),
    Method(
        "adpa",
        "method",
        "ADPA from student_sft",
        "from student_sft: NLL(y_w) − λ·Σ_a π_θ(a\\|s_t)·A(s_t,a) on its own responses; λ ="
        " `adpa.adpa_weight`: 1.6 in the paper recipes, 0.5 in the embedded default (tuned on validation)",
        ("distillation", "adpa"),
        terms=ADPA,
        inputs={**FROM_SFT, **OWN_ADVANTAGE},
        description=(
            "NLL on chosen plus the advantage term on the student's own responses (init student_sft). "
            "adpa_plus takes its settings from this section too, and starts from the dckd student."
        ),
        settings={
            "nll_weight": {**WEIGHT, "default": 1.0},
            "adpa_weight": {**WEIGHT, "default": 1.6, "description": "lambda of the advantage term."},
            "reference_clamp": {
                "type": "boolean",
                "default": False,
                "description": (
                    "Reproduce the reference code's defect of clamping the advantage into [1e-8, 1-1e-8] "
                    "(negative advantages become 0). Off: the formula's signed advantage."
                ),
            },
        },
        comparisons=(
            Comparison(CONTROL, "the advantage"),
            Comparison("adpa_no_ref", "the reference teacher"),
            Comparison("adpa_chosen", "the student's own states"),
            Comparison("dckd"),
        ),
    ),
    Method(
        "adpa_plus",
        "method",
        "ADPA+: ADPA from the DCKD student",
        "ADPA started from the DCKD student",
        ("distillation", "adpa", "dckd"),
        terms=ADPA,
        inputs={"model": f"{SEED}/dckd", **OWN_ADVANTAGE},
        section="adpa",
        comparisons=(Comparison("adpa", "the DCKD start"), Comparison("dckd")),
        against_baselines=True,
    ),
    Method(
        "adpa_no_ref",
        "ablation",
        "ablation: ADPA whose advantage is the DPO teacher's log-prob alone (no REF teacher)",
        "the paper's ablation: ADPA whose advantage is log π_dpo alone (no REF teacher), settings of `adpa`",
        ("distillation", "adpa"),
        terms=ADPA,
        inputs={**FROM_SFT, **OWN_ADVANTAGE, "advantage": f"{SEED}/advantage_no_ref"},
        section="adpa",
    ),
)

METHODS_BY_NAME: dict[str, Method] = {method.name: method for method in METHOD_ENTRIES}


def advantage_reference(method: Method) -> bool | None:
    """Whether the advantage store a method reads subtracts the REF teacher (None: it reads none)."""
    folder = method.inputs.get("advantage")
    return None if folder is None else ADVANTAGE_STORES[folder.rsplit("/", 1)[-1]]


def comparisons(teachers: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """(model, baseline) pairs of the paired-differences table, in order: each method - student_sft (the
    baselines, the control, the rest), each distillation method - chosen_sft, the attribution rows, the
    other declared comparisons, the headline method - each baseline, then `teachers`."""
    ranked = sorted(METHOD_ENTRIES, key=lambda method: KIND_ORDER.index(method.kind))
    baselines = [method.name for method in METHOD_ENTRIES if method.kind == "baseline"]
    pairs = [(method.name, BASELINE) for method in ranked]
    pairs += [(method.name, CONTROL) for method in METHOD_ENTRIES if method.distillation]
    pairs += [(model, baseline) for _, model, baseline in ingredients()]
    pairs += [(m.name, c.baseline) for m in METHOD_ENTRIES for c in m.comparisons if c.ingredient is None]
    pairs += [(m.name, baseline) for m in METHOD_ENTRIES if m.against_baselines for baseline in baselines]
    return tuple(dict.fromkeys([*pairs, *teachers]))


def ingredients() -> tuple[tuple[str, str, str], ...]:
    """(what it adds, model, baseline): the attribution table's rows, in registry order."""
    return tuple(
        (comparison.ingredient, method.name, comparison.baseline)
        for method in METHOD_ENTRIES
        for comparison in method.comparisons
        if comparison.ingredient is not None
    )


def section_schema(method: Method, training_properties: Mapping[str, Any]) -> dict[str, Any]:
    """A method's own config section in the schema: the training settings, its derived ones (refused when
    set) and its own, with their defaults."""
    derived = {
        key: {
            "type": "null",
            "default": None,
            "derived_from": source,
            "description": f"Derived, not set - {source}, which determines it.",
        }
        for key, source in method.derived.items()
    }
    return {
        "description": method.description,
        "type": "object",
        "additionalProperties": False,
        "default": {},
        "properties": {**training_properties, **derived, **method.settings},
    }
