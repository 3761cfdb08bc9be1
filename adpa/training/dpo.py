"""Stages dpo_teacher and student_dpo: DPO whose frozen reference is the initial model itself
(the REF teacher for the DPO teacher, student_sft for the student baseline); and dpkd: DPO of the
student on the DPO teacher's answers against its own, the DPO teacher its reference."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from adpa.core.errors import InputError
from adpa.inputs.data import load_preference
from adpa.modeling.lm_head import dense_lm_head
from adpa.modeling.lora import lora_config, quantization_config
from adpa.modeling.models import check_model_reference, load_model, load_tokenizer
from adpa.training.loss_rows import train_rows_with_loss_tokens
from adpa.training.train import StageRun, trainer_arguments, world_size

log = logging.getLogger("adpa")


def shared_on_disk(dataset, folder: Path):
    """The dataset saved by the first rank and read back by every rank: TRL caches the precomputed
    reference log-probs beside a dataset's files, and an in-memory dataset's cache would go to each
    process's own temporary folder, where the other ranks do not find it."""
    import datasets
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
            dataset.save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


def run_dpo(run: StageRun, model: str) -> None:
    """DPO of `model` on the preference pairs; its frozen reference is `model` itself."""
    dataset = run.params["dataset"]
    check_model_reference(model)  # cheap checks first: fail before reading data
    train_preference(run, model, load_preference(dataset, dataset["train_split"]))


def train_preference(
    run: StageRun, model: str, train_dataset, reference: str | None = None, facts: dict | None = None
) -> None:
    """TRL's DPOTrainer on `train_dataset` (prompt, chosen, rejected) from `model`, against the frozen
    `reference` (default: `model` itself, before its first step); loss_type from the stage's settings.
    `facts`: the stage's own counts for the manifest."""
    from trl import DPOConfig, DPOTrainer

    params = run.params
    training = params["training"]
    args = DPOConfig(
        **trainer_arguments(run),
        beta=training["beta"],
        loss_type=[training["loss_type"]],
        precompute_ref_log_probs=run.launch.precompute_ref_log_probs,
    )
    trust = params["trust_remote_code"]
    tokenizer = load_tokenizer(model, trust)
    # Policy and reference both start from the same model (for the teacher: the REF teacher, never a student).
    # With LoRA (dpo_teacher.peft) the reference is the policy with its adapter disabled: no second copy.
    peft = training.get("peft")
    policy = load_model(
        model,
        params["precision"],
        trust,
        quantization=quantization_config(peft),
        trained=not peft,
        attention=run.launch.attention,
    )
    # Precomputed, the reference log-probs come from the policy before its first step: no second copy
    # (unless the reference is another model).
    precompute = run.launch.precompute_ref_log_probs
    ref_model = None
    if reference is not None:
        check_model_reference(reference)
        ref_model = load_model(reference, params["precision"], trust, attention=run.launch.attention)
    elif not (peft or precompute):
        ref_model = load_model(model, params["precision"], trust, attention=run.launch.attention)
    if precompute and world_size() > 1:
        train_dataset = shared_on_disk(train_dataset, run.work_dir / "preference_pairs")
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(peft),
    )
    dense_lm_head(trainer.model)
    if trainer.ref_model is not None:
        dense_lm_head(trainer.ref_model)
    # No trainer-side evaluation: rule evaluate scores every model on the held-out pairs (the
    # trainer's would run policy and reference over them again, ~20% of this stage on CPU).
    train_rows_with_loss_tokens(run, trainer, train_dataset, stage_facts=facts)


def run_dpkd(run: StageRun, model: str, dpo_teacher: str, generations: Path, own_generations: Path) -> None:
    """DPKD (direct preference knowledge distillation, DistiLLM-2's `dpkd` loss): DPO of the student `model`
    whose chosen answer is the DPO teacher's response (`generations`), whose rejected answer is the student's
    own (`own_generations`), and whose frozen reference is the DPO teacher; loss_type sigmoid_norm compares
    per-token mean log-probs, as DistiLLM-2 does."""
    import datasets

    check_model_reference(model)
    check_model_reference(dpo_teacher)
    teacher, own = (datasets.load_from_disk(str(path)) for path in (generations, own_generations))
    if teacher["prompt"] != own["prompt"]:
        raise InputError(
            f"{run.stage}: teacher_generations and student_generations answer different prompts (stale generations?)"
        )

    def answers(texts):
        return [[{"role": "assistant", "content": text}] for text in texts]

    pairs = datasets.Dataset.from_dict(
        {"prompt": teacher["prompt"], "chosen": answers(teacher["response"]), "rejected": answers(own["response"])}
    )
    # A pair whose two answers are the same text carries no preference (its DPO logit is 0, its gradient 0).
    identical = sum(chosen == rejected for chosen, rejected in zip(teacher["response"], own["response"]))
    if identical:
        log.warning(
            "%s: %d of %d pairs have the same answer from the DPO teacher and the student: no preference to learn there",
            run.stage,
            identical,
            len(pairs),
        )
    train_preference(run, model, pairs, reference=dpo_teacher, facts={"pairs_with_identical_answers": identical})
