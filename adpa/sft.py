"""Stages ref_teacher and student_sft: supervised fine-tuning (TRL SFTTrainer).

The student is trained with the teacher's tokenizer and chat template, so every later stage
tokenizes teacher and student text identically.
"""

from __future__ import annotations

from adpa.data import load_sft, to_prompt_completion
from adpa.lm_head import dense_lm_head
from adpa.models import check_model_reference, check_same_vocabulary, load_model, load_tokenizer
from adpa.train import StageRun, train_and_export, trainer_arguments


def run_sft(run: StageRun, model_reference: str, tokenizer_reference: str | None = None) -> None:
    from trl import SFTConfig, SFTTrainer

    params, dataset = run.params, run.params["dataset"]
    check_model_reference(model_reference)  # cheap checks first: fail before reading data
    trust, revision = params["trust_remote_code"], params["base_model"].get("revision")
    if tokenizer_reference:  # student_sft: the base teacher's tokenizer, loaded as the teacher is
        source = params["tokenizer"]
        tokenizer = load_tokenizer(tokenizer_reference, source["trust_remote_code"], source["revision"])
        check_same_vocabulary(tokenizer, model_reference, trust, revision)
    else:
        tokenizer = load_tokenizer(model_reference, trust, revision)
    if params.get("chat_template"):
        tokenizer.chat_template = params["chat_template"]
    train_dataset = load_sft(dataset, dataset["train_split"])
    eval_dataset = load_sft(dataset, dataset["test_split"]) if dataset["test_split"] else None
    training = params["training"]
    if training["completion_only_loss"]:
        # As prompt + completion rows, TRL trains on the last assistant turn only.
        train_dataset = to_prompt_completion(train_dataset)
        eval_dataset = to_prompt_completion(eval_dataset) if eval_dataset is not None else None
    packing = training["packing"]
    args = SFTConfig(**trainer_arguments(run), packing=packing, completion_only_loss=training["completion_only_loss"])
    # Loaded after the config so that ZeRO-3 partitions the weights while loading.
    model = load_model(model_reference, params["precision"], trust, revision)
    if packing:
        model.config.use_cache = False
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    dense_lm_head(trainer.model)
    train_and_export(run, trainer, eval_dataset)
