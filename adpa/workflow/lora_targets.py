"""The LoRA teachers' target modules, checked before any job (`ref_teacher.peft` / `dpo_teacher.peft`).

Only the preflight imports this module: no stage runs it, so editing the check reruns nothing.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adpa.core.errors import ConfigError
from adpa.core.paths import expand_path, is_local
from adpa.modeling.lora import lora_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def teacher_model_config(config: Mapping[str, Any]) -> PretrainedConfig | None:
    """The base teacher's transformers config as its jobs build it, without weights: a local folder's
    config.json, a cached hub id's, or a GGUF file's (its `random_init` sizes applied, as base_teacher
    builds it). The REF and DPO teachers share it. None when it cannot be known offline (a hub id
    not in the cache, a folder without a readable config: other checks report those)."""
    from transformers import AutoConfig

    spec = config["models"]["base_teacher"]
    if "gguf" in spec:
        from adpa.modeling.models import gguf_location

        folder, file = gguf_location(spec["gguf"])
        model_config = copy.deepcopy(_gguf_model_config(str(folder), file))
        if hasattr(model_config, "quantization_config"):
            del model_config.quantization_config
        random_init = spec.get("random_init")
        if random_init:  # as adpa.modeling.models.materialize_base_model sizes it
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
