"""LoRA (and QLoRA) teachers: `ref_teacher.peft` / `dpo_teacher.peft` in the config.

TRL's trainers take the adapter as `peft_config`; the DPO teacher then uses its model with the
adapter disabled as the frozen reference (no second copy). A teacher is published merged: the
adapter folded into the weights it was trained on, so every later stage reads a plain model
folder. The adapter itself is kept beside, in `adapter/`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from adpa.core.errors import ConfigError

ADAPTER_DIR = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def lora_config(spec: Mapping[str, Any] | None):
    """peft.LoraConfig from a stage's `peft` settings; None trains every weight."""
    if not spec:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=spec["r"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=spec["target_modules"],
        task_type="CAUSAL_LM",
    )


def check_quantization(key: str, spec: Mapping[str, Any] | None, cuda: bool | None = None) -> None:
    """QLoRA's 4-bit base weights need bitsandbytes' CUDA kernels: one line where they cannot run."""
    if not spec or not spec.get("load_in_4bit"):
        return
    import importlib.util

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        raise ConfigError(f"config key '{key}.load_in_4bit': QLoRA needs a CUDA GPU; this machine has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"config key '{key}.load_in_4bit': QLoRA needs bitsandbytes (pip install bitsandbytes)")


def quantization_config(spec: Mapping[str, Any] | None):
    """transformers' BitsAndBytesConfig for QLoRA (NF4, bf16 compute; stored as bf16 so ZeRO-3 can shard it)."""
    if not spec or not spec.get("load_in_4bit"):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


@contextlib.contextmanager
def _outside_zero3() -> Iterator[None]:
    """Models load whole, not partitioned across the ranks, while the training's ZeRO-3 config is set."""
    from transformers.integrations import deepspeed

    kept = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = kept


def merge_saved_adapter(folder: Path, precision: str, trust_remote_code: bool) -> bool:
    """If `folder` holds a saved adapter (what Trainer.save_model writes for a PEFT model), replace
    it by the merged model: the base it names, loaded in full precision, plus the adapter. The
    adapter moves to `folder/adapter/`. Returns whether there was one."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return False
    from peft import PeftModel

    from adpa.modeling.models import load_model

    base_reference = json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"]
    adapter = folder / ADAPTER_DIR
    adapter.mkdir()
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            shutil.move(folder / name, adapter / name)
    with _outside_zero3():  # one process merges: ZeRO-3's partitioned init would wait for the others
        base = load_model(base_reference, precision, trust_remote_code)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(folder), safe_serialization=True)
    return True
