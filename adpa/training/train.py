"""What every training stage shares: trainer arguments, resumable work folders, export of the final model."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adpa.core import artifacts
from adpa.core.errors import InputError
from adpa.modeling import lora
from adpa.modeling.precision import for_training, resolve, under_deepspeed
from adpa.training import preemption
from adpa.training.batching import accumulation_steps

# TensorBoard event files: the Trainer writes them under the work folder's runs/ (one folder per
# launch, so a resume adds one), published inside the model folder: `tensorboard --logdir results`.
TENSORBOARD_DIR = "runs"

log = logging.getLogger("adpa")


@dataclass(frozen=True)
class LaunchOptions:
    """Runtime choices that do not change the result (so they are not rerun triggers); defaults: config/schema.yaml."""

    gradient_checkpointing: bool
    save_steps: int
    save_total_limit: int
    logging_steps: int
    report_to: tuple[str, ...] = ("tensorboard",)  # experiment trackers (config launch.report_to)
    run_name: str = "adpa"  # groups the trackers' runs of one workflow run
    # GPU speed switches (config launch.*, resolved for the machine by adpa.workflow.engine): same results.
    attention: str | None = None  # transformers' attn_implementation; None: its default (sdpa)
    padding_free: bool = False  # sequences of a batch concatenated, kept apart by position_ids
    loss_chunk_tokens: int = 1024  # distillation losses project the head over this many positions at a time
    liger_kernel: bool = False  # Liger's fused kernels in SFT (TRL use_liger_kernel)
    precompute_ref_log_probs: bool = False  # DPO: the frozen reference's log-probs in one pass first


@dataclass(frozen=True)
class StageRun:
    """One training stage invocation: what it trains, from where, into where."""

    stage: str
    params: dict[str, Any]
    params_json: str
    code: str  # the hash of the code it runs (adpa/workflow/provenance.py)
    output: Path
    work_root: Path
    launch: LaunchOptions
    # The config key of its max_length, for error lines (adpa.dag.stages.max_length_key; passed in, so
    # that the stage's code hash does not cover the registry).
    max_length_key: str = "max_length"
    # What it read (adpa.report.model_card.lineage), for the manifest.
    parents: Mapping[str, Any] = field(default_factory=dict)
    # Called with the staged folder, manifest written, before it is published (the model card:
    # passed in, so that no stage's code hash covers the card's code).
    before_publish: Callable[[Path], None] | None = None

    @property
    def work_dir(self) -> Path:
        """Keyed by settings, code and inputs (adpa.core.artifacts.work_key): a changed stage, or the same
        stage on other inputs, never resumes or republishes stale state."""
        key = artifacts.work_key(artifacts.params_hash(self.params_json), self.code, self.parents)
        return self.work_root / self.stage / key


# When this process had imported its stage's code (seconds since it started): the fixed cost of a
# job splits into imports, loading and set-up (to the first step), and what follows the last step.
_IMPORTS_DONE: list[float] = []


def mark_imports_done() -> None:
    import psutil

    _IMPORTS_DONE[:] = [round(time.time() - psutil.Process().create_time(), 1)]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def tracker_arguments(run: StageRun) -> dict[str, Any]:
    """The trackers and this stage's run in them: named after its output under results/ (stage,
    seed, sweep point), grouped by the workflow's run_name, unless the tracker's own environment
    variables say otherwise."""
    report_to = list(run.launch.report_to)
    for variable in ("WANDB_PROJECT", "WANDB_RUN_GROUP", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.setdefault(variable, run.launch.run_name)
    parts = run.output.parts
    name = "/".join(parts[parts.index("results") + 1 :]) if "results" in parts[:-1] else run.output.name
    return {"report_to": report_to or "none", "run_name": name, "project": run.launch.run_name}


def trainer_arguments(run: StageRun) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig."""
    import torch

    training = run.params["training"]
    precision = resolve(run.params["precision"])
    return {
        "output_dir": str(run.work_dir),
        "num_train_epochs": training["epochs"],
        "learning_rate": training["learning_rate"],
        "per_device_train_batch_size": training["per_device_batch_size"],
        "per_device_eval_batch_size": training["per_device_batch_size"],
        "gradient_accumulation_steps": accumulation_steps(training, world_size(), run.stage),
        "lr_scheduler_type": training["lr_scheduler"],
        "warmup_steps": training["warmup_ratio"],  # a float in [0, 1) is a ratio in transformers 5
        "weight_decay": training["weight_decay"],
        "max_grad_norm": training["max_grad_norm"],
        "max_length": training["max_length"],
        "bf16": precision.mixed == "bf16",
        "fp16": precision.mixed == "fp16",
        "use_cpu": not torch.cuda.is_available(),
        "activation_checkpointing": run.launch.gradient_checkpointing,
        "logging_steps": run.launch.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": run.launch.save_steps,
        "save_total_limit": run.launch.save_total_limit,
        "eval_strategy": "no",
        # All input tokens, padding included: packed SFT batches have no padding and no attention
        # mask, and its pad token is often EOS, so "non_padding" would drop every EOS there.
        "include_num_input_tokens_seen": "all",
        # Liger's layer kernels (RMSNorm, SwiGLU, RoPE) only: its fused cross-entropy would replace the
        # forward whose head adpa.modeling.lm_head projects at the labelled positions.
        "use_liger_kernel": run.launch.liger_kernel,
        "liger_kernel_config": {"fused_linear_cross_entropy": False} if run.launch.liger_kernel else None,
        "seed": run.params["seed"],
        "data_seed": run.params["seed"],
        **tracker_arguments(run),
        "disable_tqdm": False,
    }


def _trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's trainer_state.json; None when unreadable. The Trainer writes it last, so a
    checkpoint without a readable one was cut off."""
    try:
        return json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None


def last_checkpoint(work_dir: Path) -> str | None:
    """The newest complete checkpoint; newer, half-written ones (a kill while saving) are removed."""
    if not work_dir.is_dir():
        return None
    checkpoints = sorted(
        (path for path in work_dir.glob("checkpoint-*") if path.name.removeprefix("checkpoint-").isdigit()),
        key=lambda path: int(path.name.removeprefix("checkpoint-")),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if _trainer_state(checkpoint) is not None:
            return str(checkpoint)
        log.warning("removing incomplete checkpoint %s", checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


class DiskFullError(InputError):
    """A save ran out of space: one line naming the folder, what it needed and what is free."""


def _gigabytes(count: float) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def _out_of_space(error: BaseException, folder: Path, needed: int | None) -> bool:
    """ENOSPC however the writer reports it: an OSError, safetensors' 'os error 28', or torch.save's
    bare stream error (recognised by the space left being less than the save needs, when known)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return needed is not None and isinstance(error, (OSError, RuntimeError)) and artifacts.free_bytes(folder) < needed


def disk_full(stage: str, folder: Path, needed: int | None, error: BaseException) -> DiskFullError | None:
    """The one-line error for a save that ran out of space (None if `error` is something else).
    `needed` is what the save writes; None for the stages that do not train (no checkpoint either)."""
    if not _out_of_space(error, folder, needed):
        return None
    free = f"{_gigabytes(artifacts.free_bytes(folder))} free there"
    if needed is None:
        return DiskFullError(f"{stage}: no space left on the device of {folder}: {free}; free space and run again")
    return DiskFullError(
        f"{stage}: no space left on the device of {folder}: about {_gigabytes(needed)} to write, {free}; "
        "free space and run again (it resumes from the last complete checkpoint)"
    )


def engine_name(plugin) -> str:
    """plain (no DeepSpeed), zero<N>, zero<N>_offload: what adpa.workflow.engine chose, read off the run."""
    if plugin is None:
        return "plain"
    offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return f"zero{plugin.zero_stage}" + ("_offload" if offload not in (None, "none") else "")


def speed_facts(run: StageRun, trainer) -> dict[str, Any]:
    """The speed switches as this job ran them, its attention kernel and its peak GPU memory."""
    import torch

    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    config = getattr(model, "config", None)
    return {
        "attention": getattr(config, "_attn_implementation", None) or run.launch.attention,
        # As the batches were made: packed SFT always (TRL), DPO never (TRL 1.16 falls back to padding).
        "padding_free": getattr(trainer.data_collator, "padding_free", False),
        "liger_kernel": run.launch.liger_kernel,
        "loss_chunk_tokens": run.launch.loss_chunk_tokens,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
    }


def launch_facts(trainer) -> dict[str, Any]:
    """How the run was really distributed, as recorded in the manifest."""
    accelerator = trainer.accelerator
    plugin = accelerator.state.deepspeed_plugin
    return {
        "processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "device": str(accelerator.device.type),
        "mixed_precision": str(accelerator.mixed_precision),
        "engine": engine_name(plugin),
    }


def tokens_seen(checkpoint: str | None) -> int:
    """Input tokens the Trainer had counted when it saved this checkpoint (0 for a fresh start)."""
    state = _trainer_state(checkpoint) if checkpoint is not None else None
    return int(state.get("num_input_tokens_seen", 0)) if state else 0


def model_parameters(model) -> int:
    """All parameters (tied ones once); under ZeRO-3 each rank holds a shard, ds_numel is the full size."""
    return sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in model.parameters())


def trainable_parameters(model) -> int:
    """The parameters the optimizer trained (a LoRA model's adapter)."""
    return sum(
        getattr(parameter, "ds_numel", parameter.numel())
        for parameter in model.parameters()
        if parameter.requires_grad
    )


def throughput(trainer, train_output, tokens_before: int) -> dict[str, Any]:
    """Time and tokens of this launch's train() alone (a resumed stage: since its checkpoint)."""
    return {
        "train_seconds": train_output.metrics["train_runtime"],
        "train_tokens_incl_padding": trainer.state.num_input_tokens_seen - tokens_before,
        "model_parameters": model_parameters(trainer.model),
    }


def stage_clock():
    """A TrainerCallback that holds the seconds this process took to reach its first optimizer step
    (imports, loading the models and data, the trainer's and DeepSpeed's set-up), and the seconds its
    checkpoint saves took inside train() (the Trainer also saves one at the last step, the resume
    point should publishing fail), so that benchmarks can tell the training loop from its saves."""
    import psutil
    from transformers import TrainerCallback

    class StageClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds_before_first_step: float | None = None
            self.checkpoint_seconds = 0.0
            self._save_started: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.seconds_before_first_step is None:
                self.seconds_before_first_step = round(time.time() - psutil.Process().create_time(), 1)

        def on_step_end(self, args, state, control, **kwargs):
            # The Trainer's own flow callback, which runs first, has decided whether this step saves.
            self._save_started = time.perf_counter() if control.should_save else None

        def on_save(self, args, state, control, **kwargs):
            if self._save_started is not None:
                self.checkpoint_seconds += time.perf_counter() - self._save_started
                self._save_started = None

    return StageClock()


def final_metrics(trainer, eval_metrics: Mapping[str, float], launch_throughput: Mapping[str, Any]) -> dict[str, Any]:
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics: dict[str, Any] = {
        **launch_facts(trainer),
        **launch_throughput,
        "global_step": trainer.state.global_step,
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
    }
    metrics.update({key: value for key, value in eval_metrics.items() if isinstance(value, (int, float))})
    return {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in metrics.items()}


class NothingLearnedError(InputError):
    """Every logged step had a zero or non-finite loss and gradient: the model must not be published."""


def check_learned(stage: str, log_history: list[Mapping[str, Any]]) -> None:
    """Refuse a run whose every logged step has loss and gradient norm exactly 0, or a non-finite loss
    or gradient norm: it learned nothing (or diverged), and later stages would build on it."""
    steps = [entry for entry in log_history if "loss" in entry]
    if not steps:  # fewer steps than logging_steps: only the run's mean loss is logged
        steps = [{"loss": entry["train_loss"]} for entry in log_history if "train_loss" in entry]

    def idle(entry: Mapping[str, Any]) -> bool:
        loss, grad = float(entry["loss"]), float(entry.get("grad_norm", 0.0))
        return not (math.isfinite(loss) and math.isfinite(grad)) or (loss == 0.0 and grad == 0.0)

    if steps and all(idle(entry) for entry in steps):
        last = steps[-1]
        raise NothingLearnedError(
            f"{stage}: loss and gradient norm were 0 or not finite at every one of the {len(steps)} logged steps "
            f"(last: loss {last['loss']}, grad_norm {last.get('grad_norm')}); the model is not published"
        )


def train_and_export(run: StageRun, trainer, eval_dataset, data_facts: Mapping[str, int] | None = None) -> None:
    """Train (resuming from the newest checkpoint), evaluate, and publish the model atomically.

    `data_facts` (rows trained on, rows left out) go into the manifest's metrics."""
    accelerator = trainer.accelerator
    resume = last_checkpoint(run.work_dir)
    if accelerator.is_main_process:
        log.warning("%s: launch %s", run.stage, json.dumps(launch_facts(trainer)))
        if resume:
            log.warning("%s: resuming from checkpoint %s", run.stage, resume)
    tokens_before = tokens_seen(resume)  # read now: checkpoint rotation may delete it while training
    stop, clock = preemption.stop_on_signal(), stage_clock()
    trainer.add_callback(stop)
    trainer.add_callback(clock)
    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    except (OSError, RuntimeError) as error:
        # A checkpoint cut off by a full disk is removed (last_checkpoint), then the space is measured.
        last_checkpoint(run.work_dir)
        weights = next(trainer.model.parameters()).element_size()
        checkpoint = artifacts.checkpoint_bytes(model_parameters(trainer.model), weights)
        full = disk_full(run.stage, run.work_dir, checkpoint, error)
        if full is None:
            raise
        raise full from error
    if stop.stopped and stop.stopped[1] < trainer.state.max_steps:
        # A signal after the last step stops nothing: the stage publishes as usual.
        raise preemption.Preempted(run.stage, *stop.stopped, last_checkpoint(run.work_dir))
    check_learned(run.stage, trainer.state.log_history)
    launch_throughput = throughput(trainer, train_output, tokens_before)
    trained_at = time.time()
    eval_metrics = trainer.evaluate(eval_dataset) if eval_dataset is not None else {}
    staging = artifacts.staging_dir(run.output)
    if accelerator.is_main_process:
        artifacts.fresh_staging_dir(run.output)
    accelerator.wait_for_everyone()
    # Under ZeRO-3 every rank takes part in gathering the weights.
    try:
        trainer.save_model(str(staging))
    except (OSError, RuntimeError) as error:
        weights = model_parameters(trainer.model) * next(trainer.model.parameters()).element_size()
        full = disk_full(run.stage, staging, weights, error)
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays
        if full is None:
            raise
        raise full from error
    if accelerator.is_main_process:
        import psutil

        # The trainer also pickles its arguments there; a published model holds no pickle.
        (staging / "training_args.bin").unlink(missing_ok=True)
        # A LoRA teacher is published merged (the adapter kept in adapter/): later stages read a plain model.
        merged = lora.merge_saved_adapter(staging, run.params["precision"], run.params["trust_remote_code"])
        if (run.work_dir / TENSORBOARD_DIR).is_dir():
            shutil.copytree(run.work_dir / TENSORBOARD_DIR, staging / TENSORBOARD_DIR)
        trainer.processing_class.save_pretrained(str(staging))
        metrics = final_metrics(trainer, eval_metrics, launch_throughput)
        peft = bool(run.params.get("training", {}).get("peft"))
        metrics["precision"] = for_training(run.params["precision"], under_deepspeed(), frozen_base=peft).label
        metrics.update(speed_facts(run, trainer))
        if run.stage in ("dpo_teacher", "student_dpo"):
            metrics["precompute_ref_log_probs"] = run.launch.precompute_ref_log_probs
        metrics["started_at"] = round(psutil.Process().create_time(), 1)
        metrics["finished_at"] = round(time.time(), 1)
        # Before publishing: the evaluation, the model's export and its card (the publish itself is a rename).
        metrics["seconds_after_training"] = round(time.time() - trained_at, 1)
        metrics["seconds_imports"] = _IMPORTS_DONE[0] if _IMPORTS_DONE else None
        metrics["seconds_before_first_step"] = clock.seconds_before_first_step
        metrics["checkpoint_seconds"] = round(clock.checkpoint_seconds, 2)
        metrics.update(data_facts or {})
        if merged:
            metrics["trainable_parameters"] = trainable_parameters(trainer.model)
        # Every logged training loss, for the results' loss plot.
        history = [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]
        artifacts.write_manifest(
            staging,
            run.stage,
            run.params,
            run.params_json,
            run.code,
            metrics,
            extra={"loss_history": history, "parents": dict(run.parents)},
        )
        if run.before_publish is not None:
            run.before_publish(staging)
        # Until Snakemake has recorded the job (the workflow's onsuccess cleans up), a kill loses
        # only a republish: the work folder keeps the exported model, not the checkpoints.
        artifacts.keep_exported(staging, run.work_dir)
        artifacts.publish(staging, run.output)
        artifacts.clear_checkpoints(run.work_dir)
        log.warning("%s: wrote %s  %s", run.stage, run.output, json.dumps(metrics))
    accelerator.wait_for_everyone()
