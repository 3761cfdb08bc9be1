"""config/README.md, generated from config/schema.yaml (`python -m adpa config-docs > config/README.md`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from adpa.config import load_schema

HEADER = """# Configuration keys

Generated from `config/schema.yaml`, the single source of defaults, by
`python -m adpa config-docs > config/README.md` (a test checks it is current). Unknown keys are
refused with the closest known key suggested. Numbers written as YAML text (`1e-3`) or given
through `--config` are read as numbers.
"""


def _default(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _rows(properties: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
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
        yield f"| `{key}` | {kind} | {default} | {'; '.join(filter(None, notes))} |"
        yield from _rows(sub.get("properties", {}), f"{key}.")


def render() -> str:
    schema = load_schema()
    table = "| key | type | default | meaning |\n|---|---|---|---|"
    parts = [HEADER, table, *_rows(schema["properties"])]
    for title, definition in (
        ("Model source (`models.*`)", "model"),
        ("Dataset source (`datasets.sft`, `datasets.preference`)", "dataset"),
        ("Job requests (`resources.*`)", "job_resources"),
        ("LoRA teachers (`ref_teacher.peft`, `dpo_teacher.peft`)", "peft"),
    ):
        parts += ["", f"## {title}", "", table, *_rows(schema["definitions"][definition]["properties"])]
    return "\n".join(parts) + "\n"
