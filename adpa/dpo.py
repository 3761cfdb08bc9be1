"""Stages dpo_teacher and student_dpo: DPO whose frozen reference is the initial model itself
(the REF teacher for the DPO teacher, student_sft for the student baseline)."""

from __future__ import annotations

from adpa.data import load_preference
from adpa.lm_head import dense_lm_head
from adpa.lora import lora_config, quantization_config
from adpa.loss_rows import train_rows_with_loss_tokens
from adpa.models import check_model_reference, load_model, load_tokenizer
from adpa.train import StageRun, trainer_arguments


def run_dpo(run: StageRun, model: str) -> None:
    from trl import DPOConfig, DPOTrainer

    params, dataset = run.params, run.params["dataset"]
    check_model_reference(model)  # cheap checks first: fail before reading data
    train_dataset = load_preference(dataset, dataset["train_split"])
    training = params["training"]
    args = DPOConfig(**trainer_arguments(run), beta=training["beta"], loss_type=[training["loss_type"]])
    trust = params["trust_remote_code"]
    tokenizer = load_tokenizer(model, trust)
    # Policy and reference both start from the same model (for the teacher: the REF teacher, never a student).
    # With LoRA (dpo_teacher.peft) the reference is the policy with its adapter disabled: no second copy.
    peft = training.get("peft")
    policy = load_model(model, params["precision"], trust, quantization=quantization_config(peft))
    ref_model = None if peft else load_model(model, params["precision"], trust)
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
    train_rows_with_loss_tokens(run, trainer, train_dataset)
