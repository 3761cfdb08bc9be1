"""Stages ref_teacher, student_sft and seq_kd: supervised fine-tuning (TRL SFTTrainer).

The student is trained with the teacher's tokenizer and chat template, so every later stage
tokenizes teacher and student text identically. seq_kd (sequence-level KD) fine-tunes student_sft
on the DPO teacher's greedy responses to the preference prompts, loss on the responses only.
"""

from __future__ import annotations

from pathlib import Path

from adpa.inputs.data import load_sft, to_prompt_completion
from adpa.modeling.lm_head import dense_lm_head
from adpa.modeling.lora import lora_config, quantization_config
from adpa.modeling.models import check_model_reference, check_same_vocabulary, load_model, load_tokenizer
from adpa.training.loss_rows import train_rows_with_loss_tokens
from adpa.training.train import StageRun, trainer_arguments


def teacher_responses(generations: Path):
    """teacher_generations as prompt-completion rows (TRL trains on the completion only)."""
    import datasets

    loaded = datasets.load_from_disk(str(generations))
    return datasets.Dataset.from_dict(
        {
            "prompt": loaded["prompt"],
            "completion": [[{"role": "assistant", "content": response}] for response in loaded["response"]],
        }
    )


def run_sft(run: StageRun, model: str, tokenizer: str | None = None, generations: Path | None = None) -> None:
    """ref_teacher and student_sft train on the configured SFT data; seq_kd (`generations`) on the teacher's responses."""
    trainer, train_dataset, eval_dataset = sft_trainer(run, model, tokenizer, generations)
    train_rows_with_loss_tokens(run, trainer, train_dataset, eval_dataset)


def sft_trainer(run: StageRun, model: str, tokenizer: str | None = None, generations: Path | None = None):
    """The stage's SFTTrainer (the projected head patched in) and its train and eval datasets."""
    from trl import SFTConfig, SFTTrainer

    params, training = run.params, run.params["training"]
    check_model_reference(model)  # cheap checks first: fail before reading data
    trust = params["trust_remote_code"]
    revision = params["base_model"].get("revision") if "base_model" in params else None
    if tokenizer:  # student_sft: the base teacher's tokenizer, loaded as the teacher is
        source = params["tokenizer"]
        processing_class = load_tokenizer(tokenizer, source["trust_remote_code"], source["revision"])
        check_same_vocabulary(processing_class, model, trust, revision)
    else:
        processing_class = load_tokenizer(model, trust, revision)
    if params.get("chat_template"):
        processing_class.chat_template = params["chat_template"]
    completion_only = training.get("completion_only_loss", False)
    if generations is not None:
        train_dataset, eval_dataset, completion_only = teacher_responses(generations), None, True
    else:
        dataset = params["dataset"]
        train_dataset = load_sft(dataset, dataset["train_split"])
        eval_dataset = load_sft(dataset, dataset["test_split"]) if dataset["test_split"] else None
        if completion_only:
            # As prompt + completion rows, TRL trains on the last assistant turn only.
            train_dataset = to_prompt_completion(train_dataset)
            eval_dataset = to_prompt_completion(eval_dataset) if eval_dataset is not None else None
    packing = training["packing"]
    args = SFTConfig(**trainer_arguments(run), packing=packing, completion_only_loss=completion_only)
    # Loaded after the config so that ZeRO-3 partitions the weights while loading.
    peft = training.get("peft")  # ref_teacher.peft: LoRA, published merged
    loaded = load_model(
        model,
        params["precision"],
        trust,
        revision,
        quantization_config(peft),
        trained=not peft,
        attention=run.launch.attention,
    )
    if packing or run.launch.padding_free:
        loaded.config.use_cache = False  # with a cache, transformers would not look for packed sequences
    trainer = SFTTrainer(
        model=loaded,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=lora_config(peft),
    )
    if run.launch.padding_free and not packing:
        # TRL refuses padding_free without packing, as its collator would not truncate: the rows were
        # truncated to max_length when the trainer tokenized them, so only the batches change.
        trainer.data_collator.padding_free = True
    dense_lm_head(trainer.model)
    return trainer, train_dataset, eval_dataset
