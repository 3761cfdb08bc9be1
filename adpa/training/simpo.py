"""Stage simpo (baseline): SimPO of student_sft on the preference pairs, with TRL's CPOTrainer.

SimPO is reference-free: a length-normalized log-likelihood margin, beta * (avg log pi(y_w) -
avg log pi(y_l)) - gamma, under a sigmoid loss; `cpo_alpha = 0` drops CPO's NLL term (pure SimPO).
"""

from __future__ import annotations

import os

from adpa.inputs.data import load_preference
from adpa.modeling.models import check_model_reference, load_model, load_tokenizer
from adpa.training.loss_rows import train_rows_with_loss_tokens
from adpa.training.train import StageRun, trainer_arguments


def run_simpo(run: StageRun, model: str) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPOTrainer lives in trl.experimental in TRL 1.x
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    params, dataset, training = run.params, run.params["dataset"], run.params["training"]
    check_model_reference(model)  # cheap checks first: fail before reading data
    train_dataset = load_preference(dataset, dataset["train_split"])
    args = CPOConfig(
        **trainer_arguments(run),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=training["beta"],
        simpo_gamma=training["gamma"],
        gradient_checkpointing=run.launch.gradient_checkpointing,
    )
    trust = params["trust_remote_code"]
    tokenizer = load_tokenizer(model, trust)
    policy = load_model(model, params["precision"], trust, trained=True, attention=run.launch.attention)
    trainer = CPOTrainer(model=policy, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    # CPOTrainer keeps rows whose prompt fills max_length, with empty responses: left out here.
    train_rows_with_loss_tokens(run, trainer, train_dataset)
