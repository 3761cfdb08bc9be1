"""Stage gkd: on-policy distillation with TRL's GKDTrainer (Agarwal et al. 2024), what the field's trainers
ship: with probability `lmbda` a batch's answers are the student's own samples, else the chosen answers of
the preference pairs; the loss is the generalized Jensen-Shannon divergence (`beta`) between the student and
the DPO teacher, run online on those answers, over the answer tokens.
"""

from __future__ import annotations

import os

from adpa.inputs.data import load_preference
from adpa.modeling.models import check_model_reference, load_model, load_tokenizer
from adpa.training.train import StageRun, train_and_export, trainer_arguments


def conversations(prompts, answers) -> list[list[dict]]:
    """Each preference row as one conversation (prompt turns, then the answer): GKD's `messages` rows,
    whose last turn is the completion and the rest its prompt."""
    return [[*prompt, *answer] for prompt, answer in zip(prompts, answers)]


def run_gkd(run: StageRun, model: str, dpo_teacher: str) -> None:
    import datasets

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives in trl.experimental in TRL 1.x
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    params, training = run.params, run.params["training"]
    check_model_reference(model)  # cheap checks first: fail before reading data
    check_model_reference(dpo_teacher)
    dataset = params["dataset"]
    pairs = load_preference(dataset, dataset["train_split"])
    train_dataset = datasets.Dataset.from_dict({"messages": conversations(pairs["prompt"], pairs["chosen"])})
    args = GKDConfig(
        **trainer_arguments(run),
        lmbda=training["lmbda"],
        beta=training["beta"],
        temperature=training["temperature"],
        max_new_tokens=training["max_new_tokens"],
    )
    trust = params["trust_remote_code"]
    tokenizer = load_tokenizer(model, trust)
    student = load_model(model, params["precision"], trust, trained=True, attention=run.launch.attention)
    teacher = load_model(dpo_teacher, params["precision"], trust, attention=run.launch.attention)
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train_dataset, processing_class=tokenizer
    )
    train_and_export(run, trainer, None, {"train_rows": len(train_dataset)})
