"""LoRA teachers (`ref_teacher.peft`, `dpo_teacher.peft`) through the real 2-process ZeRO-3 launch of
config/tiny.yaml: each teacher is published merged, with its adapter beside it."""

from __future__ import annotations

import json

import pytest
from conftest import copy_project, planned_jobs, run_snakemake

from adpa.errors import ConfigError

pytestmark = pytest.mark.workflow
TINY = ("--configfile", "config/tiny.yaml")
LORA = ("--config", "ref_teacher={peft: {r: 4, alpha: 8}}", "dpo_teacher={peft: {r: 4, alpha: 8}}")


def test_lora_teachers_train_through_zero3_and_publish_merged_models(tmp_path, ref_teacher_project):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    workdir = copy_project(ref_teacher_project, tmp_path / "lora project")
    # The adapter settings are the REF teacher's parameters: it is trained again, then the DPO teacher.
    result = run_snakemake(workdir, "results/dpo_teacher", *TINY, *LORA)
    assert planned_jobs(result) == {"ref_teacher": 1, "dpo_teacher": 1}
    bases = {"ref_teacher": workdir / "results" / "base_teacher", "dpo_teacher": workdir / "results" / "ref_teacher"}
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    for stage, base in bases.items():
        folder = workdir / "results" / stage
        manifest = json.loads((folder / "adpa_manifest.json").read_text())
        metrics = manifest["metrics"]
        assert metrics["processes"] == 2 and metrics["zero_stage"] == 3, metrics
        assert manifest["params"]["training"]["peft"]["r"] == 4
        assert 0 < metrics["trainable_parameters"] < metrics["model_parameters"] / 100, metrics
        # A plain model folder (no adapter_config.json at its top: later stages load it as any model).
        assert not (folder / "adapter_config.json").exists() and (folder / "adapter" / "adapter_config.json").is_file()
        merged = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        plain = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
        with torch.no_grad():
            base_logits = plain(input_ids=ids).logits
            adapted = PeftModel.from_pretrained(plain, str(folder / "adapter")).eval()
            adapter_logits = adapted(input_ids=ids).logits
            merged_logits = merged(input_ids=ids).logits
        assert torch.allclose(merged_logits, adapter_logits, atol=1e-5), stage
        assert not torch.allclose(merged_logits, base_logits, atol=1e-5), f"{stage}: the adapter learned nothing"
    # Nothing downstream sees a difference but the weights: the student stages plan as usual.
    assert "teacher_topk" in planned_jobs(run_snakemake(workdir, "-n", *TINY, *LORA))


def test_qlora_without_a_cuda_gpu_is_one_line():
    from adpa.lora import check_quantization

    with pytest.raises(ConfigError, match=r"^config key 'ref_teacher.peft.load_in_4bit': QLoRA needs a CUDA GPU"):
        check_quantization("ref_teacher.peft", {"r": 8, "load_in_4bit": True}, cuda=False)
    check_quantization("ref_teacher.peft", {"r": 8, "load_in_4bit": False}, cuda=False)
    check_quantization("ref_teacher.peft", None, cuda=False)
