"""LoRA (and QLoRA) teachers: `ref_teacher.peft` / `dpo_teacher.peft` in the config.

TRL's trainers take the adapter as `peft_config`; the DPO teacher then uses its model with the
adapter disabled as the frozen reference (no second copy). A teacher is published merged: the
adapter folded into the weights it was trained on, so every later stage reads a plain model
folder. The adapter itself is kept beside, in `adapter/`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adpa.errors import ConfigError
from adpa.paths import expand_path, is_local

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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


def teacher_model_config(config: Mapping[str, Any]) -> PretrainedConfig | None:
    """The base teacher's transformers config as its jobs build it, without weights: a local folder's
    config.json, a cached hub id's, or a GGUF file's (its `random_init` sizes applied, as base_teacher
    builds it). The REF and DPO teachers share it. None when it cannot be known offline (a hub id
    not in the cache, a folder without a readable config: other checks report those)."""
    from transformers import AutoConfig

    spec = config["models"]["base_teacher"]
    if "gguf" in spec:
        from adpa.models import gguf_location

        folder, file = gguf_location(spec["gguf"])
        model_config = copy.deepcopy(_gguf_model_config(str(folder), file))
        if hasattr(model_config, "quantization_config"):
            del model_config.quantization_config
        random_init = spec.get("random_init")
        if random_init:  # as adpa.models.materialize_base_model sizes it
            model_config.update(dict(random_init))
            model_config.head_dim = random_init["hidden_size"] // random_init["num_attention_heads"]
        return model_config
    reference, trust = spec["path"], spec.get("trust_remote_code", False)
    try:
        if is_local(reference):
            folder = Path(expand_path(reference))
            if not (folder / "config.json").is_file():
                return None
            return AutoConfig.from_pretrained(folder, trust_remote_code=trust)
        return AutoConfig.from_pretrained(
            reference, revision=spec.get("revision"), trust_remote_code=trust, local_files_only=True
        )
    except (OSError, ValueError):  # not cached, unreadable, unknown model type, untrusted remote code
        return None


@functools.lru_cache(maxsize=4)
def _gguf_model_config(folder: str, file: str) -> PretrainedConfig:
    """Reading a GGUF's config parses its whole vocabulary (seconds): once per process."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, gguf_file=file)


def check_target_modules(
    key: str, spec: Mapping[str, Any] | None, model_config: PretrainedConfig | None, trust_remote_code: bool = False
) -> None:
    """`{key}.target_modules` against the teacher built from `model_config` on the meta device (no
    weights, well under a second at 7B), with peft's own matching: one ConfigError line when a listed
    name matches no module (peft itself only refuses when none does, but such a name is a typo), a
    string (`all-linear` or a regular expression) matches none, or peft cannot adapt what it matches.
    No spec (full fine-tuning) or no model config (not known offline): nothing to check."""
    if not spec or model_config is None:
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
    from transformers import AutoModelForCausalLM

    target = spec["target_modules"]
    setting = f"config key '{key}.target_modules'"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's and transformers' remarks on a model that is never run
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        keys = [name for name, _ in model.named_modules() if name]
        linear = _maybe_include_all_linear_layers(LoraConfig(target_modules=INCLUDE_LINEAR_LAYERS_SHORTHAND), model)
        layers = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear.target_modules}))
        teacher = f"the teacher ({model_config.model_type}; its linear layers: {layers})"

        def matches(modules: str | list[str]) -> bool:
            probe = LoraConfig(target_modules=modules)
            if isinstance(modules, str) and modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
                return bool(layers)
            try:
                return any(check_target_module_exists(probe, name) for name in keys)
            except re.error as err:
                raise ConfigError(f"{setting}: '{modules}' is not a regular expression ({err})") from err

        if isinstance(target, str):
            if not matches(target):
                named = next((name for name in keys if name.endswith(f".{target}")), None)  # as a list would match
                hint = f" (a string is a regular expression over whole names such as {named}: write [{target}])"
                raise ConfigError(f"{setting}: '{target}' matches no module of {teacher}{hint if named else ''}")
        else:
            unmatched = [name for name in target if not matches([name])]
            if unmatched:
                verb = "matches" if len(unmatched) == 1 else "match"
                raise ConfigError(f"{setting}: {', '.join(unmatched)} {verb} no module of {teacher}")
        try:  # what peft refuses beyond the names: a matched module it has no LoRA layer for (a whole block)
            get_peft_model(model, lora_config({"r": 8, "alpha": 16, "dropout": 0.0, **spec}), low_cpu_mem_usage=True)
        except ValueError as err:
            detail = " ".join(str(err).split())
            refused = re.match(r"Target module (\w+)\(", detail)
            if refused:
                raise ConfigError(
                    f"{setting}: peft has no LoRA layer for the {refused.group(1)} modules it matches: name layers "
                    f"of {teacher}"
                ) from err
            raise ConfigError(f"{setting}: peft refuses it for {teacher}: {detail}") from err


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

    from adpa.models import load_model

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
