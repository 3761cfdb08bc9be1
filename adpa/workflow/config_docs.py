"""config/README.md, generated from config/schema.yaml (`python -m adpa config-docs > config/README.md`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import yaml

from adpa.workflow.checks import checks_of
from adpa.workflow.config import load_schema

HEADER = """# Configuration keys

Generated from `config/schema.yaml`, the single source of defaults, by
`python -m adpa config-docs > config/README.md` (a test checks it is current). Unknown keys are
refused with the closest known key suggested. Numbers written as YAML text (`1e-3`) or given
through `--config` are read as numbers. "Checked before any job" names what
`python -m adpa check --configfile FILE` and the workflow's preflight check of a key beyond its
type and bounds (adpa/workflow/checks.py), each problem one line naming the key
([docs/troubleshooting.md](../docs/troubleshooting.md)).
"""


def _default(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _sentence_part(text: str) -> str:
    """Lower-cased first letter, unless it starts an acronym (QLoRA, GGUF)."""
    return text if text[1:2].isupper() else text[:1].lower() + text[1:]


def _checks(key: str, owners: Sequence[str]) -> list[str]:
    """The registered checks (adpa/workflow/checks.py) of a key, under each config path it is declared at."""
    paths = [f"{owner}.{key}" for owner in owners] if owners else [key]
    found = {_sentence_part(check.summary): None for path in paths for check in checks_of(path)}
    return [f"checked before any job: {'; '.join(found)}"] if found else []


def _rows(properties: Mapping[str, Any], prefix: str = "", owners: Sequence[str] = ()) -> Iterator[str]:
    for name, sub in properties.items():
        key = f"{prefix}{name}"
        if "$ref" in sub:
            kind = sub["$ref"].rsplit("/", 1)[-1]
            what = {"job_resources": "job requests", "peft": "LoRA settings, unset: full fine-tuning"}.get(kind)
            yield f"| `{key}` | object |  | {what or f'a {kind} source'} (see below) |"
            continue
        kind = sub.get("type", "object")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        default = _default(sub["default"]) if "default" in sub else ""
        notes = [" ".join(str(sub.get("description", "")).split()).rstrip(".")]
        if "enum" in sub:
            notes.append("one of " + ", ".join("null" if value is None else str(value) for value in sub["enum"]))
        for keyword, word in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
        ):
            if keyword in sub:
                notes.append(f"{word} {sub[keyword]}")
        notes += _checks(key, owners)
        yield f"| `{key}` | {kind} | {default} | {'; '.join(filter(None, notes))} |"
        yield from _rows(sub.get("properties", {}), f"{key}.", owners)


def render() -> str:
    schema = load_schema()
    table = "| key | type | default | meaning |\n|---|---|---|---|"
    parts = [HEADER, table, *_rows(schema["properties"])]
    for title, definition, owners in (
        ("Model source (`models.*`)", "model", ("models.base_teacher", "models.base_student")),
        ("Dataset source (`datasets.sft`, `datasets.preference`)", "dataset", ("datasets.sft", "datasets.preference")),
        ("Job requests (`resources.*`)", "job_resources", ()),
        ("LoRA teachers (`ref_teacher.peft`, `dpo_teacher.peft`)", "peft", ("ref_teacher.peft", "dpo_teacher.peft")),
    ):
        rows = _rows(schema["definitions"][definition]["properties"], owners=owners)
        parts += ["", f"## {title}", "", table, *rows]
    return "\n".join(parts) + "\n"
