"""The GPU speed work changes no result: the engine each job picks, fp32 master weights under half
precision, padding-free SFT batches with the padded batches' loss."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from adpa.modeling.precision import Precision, for_training
from adpa.workflow import config as adpa_config
from adpa.workflow import engine, launch

GB = 1e9


@pytest.mark.parametrize(
    ("on", "processes", "parameters", "memory", "expected"),
    [
        ("cpu", 1, 10**8, None, "plain"),
        ("cpu", 2, 10**8, None, "zero3"),
        ("gpu", 1, 1.7e9, 80, "plain"),  # 27 GB of state on an 80 GB GPU
        ("gpu", 1, 7.24e9, 80, "zero3_offload"),  # Mistral-7B: 116 GB does not fit one GPU
        ("gpu", 2, 1.7e9, 80, "zero2"),
        ("gpu", 2, 7.24e9, 85.5, "zero3"),  # the seed guide's 2 x 80 GB: 58 GB each
        ("gpu", 2, 7.24e9, 24, "zero3_offload"),
        ("gpu", 2, None, 80, "zero3"),  # a hub id: its size is not known before it loads
        ("gpu", 1, 1.7e9, None, "zero3"),
    ],
)
def test_engine_choice(on, processes, parameters, memory, expected):
    choice = engine.choose(on, processes, parameters, memory)
    assert choice.engine == expected
    assert (REPO / choice.accelerate_file).is_file()
    if on == "gpu" and choice.state_gb is not None:
        assert choice.state_gb <= engine.STATE_SHARE * memory or expected == "zero3_offload"


def test_state_estimates():
    # 16 bytes per trained parameter; DPO's frozen reference adds 2; LoRA trains the adapter only.
    assert engine.state_bytes("plain", 10**9, 1, reference=False, lora=False) == 16 * GB
    assert engine.state_bytes("plain", 10**9, 1, reference=True, lora=False) == 18 * GB
    assert engine.state_bytes("plain", 10**9, 1, reference=False, lora=True) == 2 * GB
    assert engine.state_bytes("zero2", 10**9, 2, reference=False, lora=False) == 9 * GB
    assert engine.state_bytes("zero3", 10**9, 4, reference=False, lora=False) == 4 * GB
    assert engine.state_bytes("zero3_offload", 10**9, 2, reference=False, lora=False) == 2 * GB
    # dpkd's reference and gkd's online teacher: another frozen model, 2 bytes per parameter.
    assert engine.state_bytes("plain", 10**9, 1, reference=False, lora=False, other_frozen=7 * 10**9) == 30 * GB


def test_a_frozen_teacher_beside_the_student_counts_in_the_choice(tmp_path):
    student, teacher = _tiny_model(tmp_path / "student"), _tiny_model(tmp_path / "teacher", hidden=64)
    count = sum(p.numel() for p in student.parameters())
    teacher_count = sum(p.numel() for p in teacher.parameters())
    settings = {
        "accelerate_config": "auto",
        "device": "gpu",
        "num_processes": 1,
        "num_machines": 1,
        "zero_stage": None,
    }
    # A GPU whose 75% holds the student's 16 bytes per parameter but not the teacher's 2 beside them.
    memory = (16 * count + teacher_count) / engine.STATE_SHARE / 1e9
    alone = engine.choose_for_job(settings, "gkd", {}, str(tmp_path / "student"), memory_gb=memory)
    both = engine.choose_for_job(
        settings, "gkd", {}, str(tmp_path / "student"), memory_gb=memory, frozen_models=(str(tmp_path / "teacher"),)
    )
    assert (alone.engine, both.engine) == ("plain", "zero3_offload")


def test_an_explicit_file_or_zero_stage_wins():
    base = {"accelerate_config": "auto", "device": "gpu", "gpu_memory_gb": 80, "num_processes": 1}
    base |= {"num_machines": 1, "zero_stage": None}
    explicit = engine.choose_for_job({**base, "accelerate_config": "my.yaml"}, "ref_teacher", {}, "x")
    assert (explicit.engine, explicit.accelerate_file) == ("explicit", "my.yaml")
    assert engine.choose_for_job({**base, "zero_stage": 2}, "ref_teacher", {}, "x").engine == "zero2"


def _tiny_model(folder=None, hidden=32, **settings):
    """A random 2-layer Llama of vocabulary 300, saved as safetensors in `folder` when one is given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **settings,
    )
    model = LlamaForCausalLM(config).float()
    if folder is not None:
        model.save_pretrained(folder, safe_serialization=True)
    return model


def test_engine_command_reads_the_model_size_from_its_safetensors(tmp_path):
    model = _tiny_model(tmp_path / "model")
    assert engine.model_parameters(str(tmp_path / "model")) == sum(p.numel() for p in model.parameters())
    settings = {"accelerate_config": "auto", "device": "gpu", "gpu_memory_gb": 1e-5, "num_processes": 2}
    settings |= {"num_machines": 1, "zero_stage": None}
    params = json.dumps({"training": {}})
    result = subprocess.run(
        [sys.executable, "-m", "adpa", "engine", "--launch", json.dumps(settings)]
        + ["dpo_teacher", "--params", params, "--model", str(tmp_path / "model"), "--output", "x"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    # 2 processes of a 10 kB GPU: nothing but ZeRO-3 with the optimizer on the host.
    assert result.stdout.strip() == str(REPO / "config/accelerate/deepspeed_zero3_offload.yaml")
    assert "dpo_teacher: engine zero3_offload" in result.stderr


def test_auto_launch_asks_the_engine_with_the_stage_arguments():
    config = adpa_config.load_config(REPO / "config" / "config.yaml", {"launch": {"device": "cpu"}})
    assert config["launch"]["accelerate_config"] == "auto"
    words = shlex.split(launch.training_command(config, REPO))
    assert words[-3] == "-c" and words[-1] == "adpa-launch"
    launcher = words[-2]  # the launcher's shell: the stage's arguments follow as "$@"
    assert launcher.startswith('engine="$(') and "engine --launch" in launcher
    assert 'then exec python -u -m adpa "$@"; fi; accelerate launch --config_file "$engine" ' in launcher
    assert launcher.endswith('-m adpa "$@"')
    settings = json.loads(re.search(r"engine --launch '(\{.*?\})'", launcher).group(1))
    assert settings["device"] == "cpu" and settings["num_processes"] == 1
    assert not launch.runs_on_gpus(config, REPO)
    # An explicit file keeps today's command.
    tiny = adpa_config.load_config(REPO / "config" / "tiny.yaml")
    assert "engine --launch" not in launch.training_command(tiny, REPO)


@pytest.mark.parametrize(("processes", "ranks"), [(1, 1), (2, 2)])
def test_auto_launch_runs_one_process_without_the_launcher_and_several_through_it(processes, ranks):
    """The launcher's shell for real, with `free-port` as the stage: one CPU process runs `direct`
    (no accelerate launcher), two go through accelerate launch with ZeRO-3, each rank printing."""
    overrides = {"launch": {"accelerate_config": "auto", "device": "cpu", "num_processes": processes}}
    config = adpa_config.load_config(REPO / "config" / "tiny.yaml", overrides)
    command = launch.training_command(config, REPO) + " free-port"
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ports = [line for line in result.stdout.splitlines() if line.isdigit()]
    assert len(ports) == ranks
    engine_line = next(line for line in result.stderr.splitlines() if line.startswith("free-port: engine "))
    assert engine_line.split()[2] == ("plain" if processes == 1 else "zero3")
    launcher_lines = [line for line in result.stderr.splitlines() if line and line != engine_line]
    assert bool(launcher_lines) == (processes > 1)  # direct: nothing but the stage itself ran


def test_fp32_master_weights_whenever_no_deepspeed_optimizer_holds_them():
    assert for_training("bf16", deepspeed=False) == Precision("fp32", "bf16")
    assert for_training("fp16", deepspeed=False) == Precision("fp32", "fp16")
    assert for_training("bf16", deepspeed=True) == Precision("bf16", "bf16")  # DeepSpeed's fp32 master
    assert for_training("bf16", deepspeed=False, frozen_base=True) == Precision("bf16", "bf16")  # LoRA's base
    assert for_training("fp32", deepspeed=False) == Precision("fp32", "no")


def _one_adamw_step(model, bf16: bool, tmp_path) -> dict[str, torch.Tensor]:
    """One real Trainer step at the DPO teacher's learning rate; the weights' change, in fp32."""
    import datasets
    from transformers import Trainer, TrainingArguments

    before = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (4, 16))
    rows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        learning_rate=5e-7,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=1,
        per_device_train_batch_size=4,
        bf16=bf16,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    return {name: p.detach().float() - before[name] for name, p in model.named_parameters()}


def test_an_adamw_step_at_lr_5e7_moves_fp32_master_weights_as_fp32_does_and_bf16_drops_it(tmp_path):
    """What `precision: bf16` trains without DeepSpeed: the stage's loader gives fp32 weights under
    bf16 autocast, whose step equals the fp32 reference's; bf16 parameters would keep almost none."""
    from adpa.modeling.models import load_model

    _tiny_model(tmp_path / "model", hidden=64)
    master = load_model(str(tmp_path / "model"), "bf16", trained=True)
    frozen_kind = load_model(str(tmp_path / "model"), "bf16")  # the inference stages' load
    assert master.dtype == torch.float32 and frozen_kind.dtype == torch.bfloat16
    reference = _one_adamw_step(load_model(str(tmp_path / "model"), "fp32"), bf16=False, tmp_path=tmp_path)
    mixed = _one_adamw_step(master, bf16=True, tmp_path=tmp_path)
    pure = _one_adamw_step(frozen_kind, bf16=True, tmp_path=tmp_path)
    moved = torch.cat([delta.flatten() for delta in reference.values()])
    mixed_moved = torch.cat([delta.flatten() for delta in mixed.values()])
    pure_moved = torch.cat([delta.flatten() for delta in pure.values()])
    assert (moved != 0).float().mean() > 0.99  # AdamW's first step moves every weight by ~lr
    # bf16 autocast gradients, so the same step almost everywhere; at worst a near-zero gradient's
    # sign flips (2 lr).
    assert (mixed_moved - moved).abs().le(5e-8).float().mean() > 0.95
    assert (mixed_moved - moved).abs().max() <= 2 * 5e-7 * 1.01
    assert (pure_moved != 0).float().mean() < 0.02  # bf16 parameters silently keep their values


def test_padding_free_sft_batch_has_the_padded_loss_and_gradients():
    """TRL's collator with padding_free (what adpa.training.sft switches on) against the same rows padded: the
    same loss and gradients through the dense head, so sdpa keeps the concatenated sequences apart."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from adpa.modeling.lm_head import dense_lm_head

    model = _tiny_model(attn_implementation="sdpa")
    dense_lm_head(model)
    rows = []
    for length in (9, 17, 5, 12):
        ids = torch.randint(1, 300, (length,)).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]  # completion-only: the prompt half is not trained
        rows.append({"input_ids": ids, "labels": labels})

    def loss_and_grads(padding_free: bool, break_positions: bool = False):
        trained = copy.deepcopy(model)
        dense_lm_head(trained)
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(copy.deepcopy(rows))
        if break_positions:  # one long sequence: the rows would see each other
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
        output = trained(**inputs, labels=batch["labels"], fused_lm_head=True)
        output.loss.backward()
        return output.loss.detach(), {name: p.grad for name, p in trained.named_parameters()}

    padded_loss, padded_grads = loss_and_grads(False)
    free_loss, free_grads = loss_and_grads(True)
    assert torch.allclose(free_loss, padded_loss, atol=1e-6)
    for name, grad in padded_grads.items():
        assert torch.allclose(free_grads[name], grad, atol=1e-6), name
    leaked_loss, _ = loss_and_grads(True, break_positions=True)  # the negative control
    assert not torch.allclose(leaked_loss, padded_loss, atol=1e-4)


def test_dpo_with_precomputed_reference_log_probs_trains_as_with_the_reference_beside(tmp_path, ref_teacher_project):
    """The DPO teacher on the tiny data, its reference's log-probs precomputed (TRL) or computed beside
    every step: the same losses at every logged step."""
    import yaml
    from conftest import copy_tiny_inputs

    inputs = copy_tiny_inputs(ref_teacher_project, tmp_path / "inputs")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["datasets"]["sft"] = {"path": str(inputs / "sft"), "test_split": None}
    config["datasets"]["preference"] = {"path": str(inputs / "preference")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    histories = {}
    for precompute in ("false", "true"):
        output = tmp_path / f"dpo {precompute}"
        result = subprocess.run(
            [sys.executable, "-m", "adpa", "dpo_teacher", "--configfile", str(path)]
            + ["--model", str(ref_teacher_project / "results" / "ref_teacher"), "--output", str(output)]
            + ["--work-dir", str(tmp_path / f"work {precompute}"), "--threads", "1", "--report-to"]
            + ["--precompute-ref-log-probs", precompute],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("Computing reference log probs" in result.stderr) == (precompute == "true")
        manifest = json.loads((output / "adpa_manifest.json").read_text())
        assert manifest["metrics"]["precompute_ref_log_probs"] == (precompute == "true")
        assert manifest["metrics"]["engine"] == "plain"
        # The fixed cost's parts: imports, then loading and set-up, then what follows the last step.
        metrics = manifest["metrics"]
        assert 0 < metrics["seconds_imports"] < metrics["seconds_before_first_step"]
        assert metrics["seconds_after_training"] >= 0
        histories[precompute] = manifest["loss_history"]
    assert len(histories["true"]) == len(histories["false"]) >= 2
    for (step, loss), (other_step, other_loss) in zip(histories["true"], histories["false"]):
        assert step == other_step and loss == pytest.approx(other_loss, abs=1e-5)
