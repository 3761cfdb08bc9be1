"""LoRA teachers (`ref_teacher.peft`, `dpo_teacher.peft`) through the real 2-process ZeRO-3 launch of
config/tiny.yaml: each teacher is published merged, with its adapter beside it. Before any job, the
adapter's target_modules are checked against the teacher built on the meta device (no weights)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import REPO, copy_project, planned_jobs, run_snakemake

from adpa.core.errors import ConfigError

TINY = ("--configfile", "config/tiny.yaml")
LORA = ("--config", "ref_teacher={peft: {r: 4, alpha: 8}}", "dpo_teacher={peft: {r: 4, alpha: 8}}")
LLAMA_LAYERS = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"


@pytest.mark.workflow
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
    from adpa.modeling.lora import check_quantization

    with pytest.raises(ConfigError, match=r"^config key 'ref_teacher.peft.load_in_4bit': QLoRA needs a CUDA GPU"):
        check_quantization("ref_teacher.peft", {"r": 8, "load_in_4bit": True}, cuda=False)
    check_quantization("ref_teacher.peft", {"r": 8, "load_in_4bit": False}, cuda=False)
    check_quantization("ref_teacher.peft", None, cuda=False)


def peft_spec(target_modules) -> dict:
    return {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": target_modules, "load_in_4bit": False}


@pytest.fixture(scope="module")
def gguf_teacher():
    """config/tiny.yaml's base teacher: SmolLM2's GGUF (llama) at its random_init size."""
    from adpa.workflow.config import read_config_file
    from adpa.workflow.lora_targets import teacher_model_config

    return teacher_model_config(read_config_file(REPO / "config" / "tiny.yaml"))


def tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )


@pytest.fixture(params=["gguf", "tiny_llama"])
def teacher_config(request, gguf_teacher):
    return gguf_teacher if request.param == "gguf" else tiny_llama()


def test_teacher_model_config_of_the_gguf_teacher_is_its_random_init_size(gguf_teacher):
    assert gguf_teacher.model_type == "llama"
    assert (gguf_teacher.hidden_size, gguf_teacher.num_hidden_layers, gguf_teacher.head_dim) == (64, 2, 16)
    assert gguf_teacher.vocab_size == 49152 and not hasattr(gguf_teacher, "quantization_config")


def test_teacher_model_config_from_a_local_folder_or_none_offline(tmp_path):
    from adpa.workflow.lora_targets import teacher_model_config

    def teacher(**spec):
        return teacher_model_config({"models": {"base_teacher": {"trust_remote_code": False, **spec}}})

    tiny_llama().save_pretrained(tmp_path / "teacher")
    loaded = teacher(path=str(tmp_path / "teacher"))
    assert loaded.model_type == "llama" and loaded.num_hidden_layers == 2
    assert teacher(path=str(tmp_path / "no teacher here")) is None
    assert teacher(path="adpa-tests/never-downloaded-model") is None  # not in the cache: not checked


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "v_proj"], r".*\.self_attn\.(q|v)_proj"])
def test_lora_target_modules_that_peft_matches_are_accepted(teacher_config, target):
    from adpa.workflow.lora_targets import check_target_modules

    check_target_modules("ref_teacher.peft", peft_spec(target), teacher_config)


def test_lora_target_module_that_matches_nothing_is_one_line(teacher_config):
    from adpa.workflow.lora_targets import check_target_modules

    with pytest.raises(ConfigError) as refused:
        check_target_modules("dpo_teacher.peft", peft_spec(["q_proj", "nonexistent_proj"]), teacher_config)
    assert str(refused.value) == (
        "config key 'dpo_teacher.peft.target_modules': nonexistent_proj matches no module of the teacher "
        f"(llama; its linear layers: {LLAMA_LAYERS})"
    )
    with pytest.raises(ConfigError) as refused:
        check_target_modules("ref_teacher.peft", peft_spec(["qproj", "v_proj", "vproj"]), teacher_config)
    assert str(refused.value) == (
        "config key 'ref_teacher.peft.target_modules': qproj, vproj match no module of the teacher "
        f"(llama; its linear layers: {LLAMA_LAYERS})"
    )


def test_lora_target_module_strings_and_blocks_peft_refuses_are_one_line():
    from adpa.workflow.lora_targets import check_target_modules

    teacher = tiny_llama()
    setting = "config key 'ref_teacher.peft.target_modules'"
    layers = f"the teacher (llama; its linear layers: {LLAMA_LAYERS})"
    with pytest.raises(ConfigError) as refused:  # a string is a regular expression over the whole name
        check_target_modules("ref_teacher.peft", peft_spec("q_proj"), teacher)
    assert str(refused.value) == (
        f"{setting}: 'q_proj' matches no module of {layers} (a string is a regular expression over whole names "
        "such as model.layers.0.self_attn.q_proj: write [q_proj])"
    )
    with pytest.raises(ConfigError, match=r"^config key .*: '\(' is not a regular expression \(missing \)"):
        check_target_modules("ref_teacher.peft", peft_spec("("), teacher)
    with pytest.raises(ConfigError) as refused:  # matched, but a whole block: peft has no LoRA layer for it
        check_target_modules("ref_teacher.peft", peft_spec(["mlp"]), teacher)
    assert (
        str(refused.value)
        == f"{setting}: peft has no LoRA layer for the LlamaMLP modules it matches: name layers of {layers}"
    )
    check_target_modules("ref_teacher.peft", None, teacher)  # full fine-tuning
    check_target_modules("ref_teacher.peft", peft_spec(["nonexistent_proj"]), None)  # teacher unknown offline


@pytest.mark.parametrize("size", ["tiny", "7b"])
def test_lora_target_module_check_builds_the_teacher_on_the_meta_device_in_a_second(size):
    from transformers import MistralConfig

    from adpa.workflow.lora_targets import check_target_modules

    teacher = tiny_llama()
    if size == "7b":  # Mistral-7B's shape: 28 GB of fp32 weights, were they built
        teacher = MistralConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000)
    check_target_modules("ref_teacher.peft", peft_spec(["q_proj"]), teacher)  # once for the imports
    timings = {}
    for target in ("all-linear", ["q_proj", "v_proj"]):
        start = time.perf_counter()
        check_target_modules("ref_teacher.peft", peft_spec(target), teacher)
        timings[str(target)] = time.perf_counter() - start
    start = time.perf_counter()
    with pytest.raises(ConfigError):
        check_target_modules("dpo_teacher.peft", peft_spec(["q_proj", "nonexistent_proj"]), teacher)
    timings["refused"] = time.perf_counter() - start
    print(size, {target: f"{seconds:.3f} s" for target, seconds in timings.items()})
    assert max(timings.values()) < 10, timings  # a shared CPU's margin; typically well under a second
