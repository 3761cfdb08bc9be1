"""Datasets: loading from any source and normalizing both dataset forms once (generation: adpa/inputs/datagen.py).

SFT rows become `{"messages": [...]}`; preference rows become TRL's conversational form
`{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}`. Bad rows raise a DataError
naming the source and row before any training starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from adpa.core.errors import InputError
from adpa.core.paths import expand_path, is_local

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
log = logging.getLogger("adpa")


class DataError(InputError):
    """A dataset that cannot be used; the message names the source and row."""


def _message(raw: Any, where: str) -> Message:
    if not isinstance(raw, Mapping) or "role" not in raw or "content" not in raw:
        raise DataError(f"{where}: each message needs 'role' and 'content', got {raw!r:.80}")
    role, content = raw["role"], raw["content"]
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise DataError(f"{where}: message content must be text, got {type(content).__name__}")
    return {"role": role, "content": content}


def _conversation(raw: Any, where: str) -> list[Message]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise DataError(f"{where}: expected a non-empty list of messages")
    return [_message(message, where) for message in raw]


def _assistant_turn(raw: Any, where: str) -> list[Message]:
    """A response given as text, one message, or a one-message list; must be a non-empty assistant turn."""
    if isinstance(raw, str):
        messages = [{"role": "assistant", "content": raw}]
    elif isinstance(raw, Mapping):
        messages = [_message(raw, where)]
    else:
        messages = _conversation(raw, where)
    last = messages[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        raise DataError(f"{where}: the response must end with a non-empty assistant message")
    return messages


def normalize_sft_row(row: Mapping[str, Any], where: str) -> dict[str, list[Message]]:
    if "messages" not in row:
        raise DataError(f"{where}: missing column 'messages' (have: {', '.join(sorted(row))})")
    messages = _conversation(row["messages"], where)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: no non-empty assistant turn")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the conversation must end with a non-empty assistant turn")
    users = [m for m in messages if m["role"] == "user"]
    if not users or any(not m["content"].strip() for m in users):
        raise DataError(f"{where}: {'an empty user turn' if users else 'no user turn'}")
    return {"messages": messages}


def normalize_preference_row(row: Mapping[str, Any], where: str) -> dict[str, list[Message]]:
    """dpo-mix form (chosen/rejected full conversations) or TRL form (prompt + responses)."""
    for column in ("chosen", "rejected"):
        if column not in row:
            raise DataError(f"{where}: missing column '{column}' (have: {', '.join(sorted(row))})")
    if "prompt" in row and row["prompt"] is not None:
        raw_prompt = row["prompt"]
        if isinstance(raw_prompt, str):
            prompt = [{"role": "user", "content": raw_prompt}]
        else:
            prompt = _conversation(raw_prompt, f"{where} (prompt)")
        chosen = _assistant_turn(row["chosen"], f"{where} (chosen)")
        rejected = _assistant_turn(row["rejected"], f"{where} (rejected)")
        for column, response in (("chosen", chosen), ("rejected", rejected)):
            # A full conversation next to a prompt column must continue that prompt.
            if len(response) > 1 and response[:-1] != prompt:
                raise DataError(f"{where}: the '{column}' conversation does not start with the row's 'prompt'")
    else:
        full_chosen = _assistant_turn(row["chosen"], f"{where} (chosen)")
        full_rejected = _assistant_turn(row["rejected"], f"{where} (rejected)")
        prompt = full_chosen[:-1]
        if full_rejected[:-1] != prompt:
            raise DataError(f"{where}: chosen and rejected conversations have different prompts")
        chosen, rejected = full_chosen[-1:], full_rejected[-1:]
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise DataError(f"{where}: chosen and rejected responses are identical (no preference to learn)")
    return {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}


@dataclass
class RawSplit:
    """The rows of one split as read, and how to name row i in an error (e.g. 'row 3' or 'file.jsonl line 5')."""

    rows: Sequence[Mapping[str, Any]]
    labels: Sequence[str] | None = None
    source: str = ""  # the file(s) or folder read, for an error about the whole split

    def label(self, index: int) -> str:
        return f"row {index} ({self.labels[index]})" if self.labels is not None else f"row {index}"

    def head(self, limit: int | None) -> RawSplit:
        if not limit or limit >= len(self.rows):
            return self
        rows = self.rows.select(range(limit)) if isinstance(self.rows, datasets.Dataset) else self.rows[:limit]
        return RawSplit(rows, self.labels[:limit] if self.labels is not None else None, self.source)


JSON_SUFFIXES = (".json", ".jsonl")
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_json_rows(path: Path, reference: str, in_folder: bool = False) -> RawSplit:
    """A JSON list or JSON lines, read as text: every row keeps the types it was written with (no
    column-wide type inference), and a line that is not JSON is named."""
    prefix = f"{path.name} " if in_folder else ""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"dataset '{reference}': {path.name} is not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise DataError(f"dataset '{reference}': cannot read {path}: {err.strerror or err}") from err
    if not text.strip():
        raise DataError(f"dataset '{reference}': {path.name} is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON list of rows
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"dataset '{reference}': {path.name} line {err.lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(loaded, list):
            raise DataError(f"dataset '{reference}': {path.name} holds JSON but not a list of rows")
        rows, labels = loaded, [f"{prefix}item {index}" for index in range(len(loaded))]
    else:  # JSON lines; blank lines are skipped
        rows, labels = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"dataset '{reference}': {path.name} line {number}: invalid JSON ({err.msg})") from err
            labels.append(f"{prefix}line {number}")
    for row, label in zip(rows, labels):
        if not isinstance(row, dict):
            raise DataError(
                f"dataset '{reference}': {label}: expected a JSON object per row, got {type(row).__name__}"
            )
    return RawSplit(rows, labels, str(path))


def _folder_splits(path: Path, reference: str) -> dict[str, list[Path]]:
    """Split name -> data files of a folder, by the `datasets` library's naming rules (train.jsonl, test-*.parquet, ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
        files = DataFilesDict.from_patterns(patterns, base_path=str(path))
    except Exception as err:  # EmptyDatasetError and friends
        raise DataError(
            f"dataset '{reference}': no data files (.jsonl, .json, .parquet, ...) in folder {path}"
        ) from err
    return {split: [Path(file) for file in found] for split, found in files.items()}


def load_split(spec: Mapping[str, Any], split: str) -> RawSplit:
    """Load one split from a hub id, a save_to_disk folder, a data-file folder or a single file.

    A split without rows is one DataError line naming it and where it lives: `datasets` itself fails on
    an empty saved split or parquet file with an IndexError or ArrowInvalid that names neither."""
    raw = _read_split(spec, split)
    if not len(raw.rows):
        raise DataError(f"dataset '{spec['path']}' split '{split}' has no rows ({raw.source})")
    return raw


def _names(splits: Iterable[Any]) -> str:
    """Split names for a message, sorted: `datasets` keys are NamedSplit objects, which str.join refuses."""
    return ", ".join(sorted(str(split) for split in splits))


def _saved_split_is_empty(folder: Path) -> bool:
    """Whether a save_to_disk Dataset folder holds no data file (how `datasets` saves zero rows)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable: loading it reports the error
    return isinstance(state, dict) and state.get("_data_files") == []


def _parquet_is_empty(files: Sequence[Path]) -> bool:
    """Whether parquet files hold no row at all, from their footers (`datasets` cannot read such a file)."""
    if not files or any(file.suffix != ".parquet" for file in files):
        return False
    import pyarrow.parquet as pq

    try:
        return all(pq.ParquetFile(file).metadata.num_rows == 0 for file in files)
    except Exception:  # not parquet after all: loading it reports the error
        return False


def _saved_dict_splits(path: Path, reference: str) -> list[str]:
    """The split names a save_to_disk DatasetDict folder lists in its dataset_dict.json."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"dataset '{reference}': cannot be read (dataset_dict.json: {type(err).__name__})") from err
    return [str(split) for split in splits]


def _shown(file: Path, folder: Path) -> str:
    """A data file of `folder` as the user wrote the folder (`datasets` resolves the files' paths)."""
    try:
        return str(folder / file.relative_to(folder.resolve()))
    except ValueError:
        return str(file)


def _read_split(spec: Mapping[str, Any], split: str) -> RawSplit:
    reference = spec["path"]
    path = Path(expand_path(reference))
    if not is_local(reference):
        return RawSplit(
            _split_of(_load(reference, datasets.load_dataset, reference), reference, split),
            None,
            f"hub dataset {reference}",
        )
    if not path.exists():
        raise DataError(f"dataset '{reference}': no such file or directory: {path}")
    if path.is_file():
        kind = DATA_SUFFIXES.get(path.suffix)
        if kind is None:
            raise DataError(f"dataset '{reference}': unsupported file type '{path.suffix}' (.json, .jsonl, .parquet)")
        if split != "train":
            raise DataError(f"dataset '{reference}': a single file holds only the split 'train', not '{split}'")
        if kind == "json":
            return read_json_rows(path, reference)
        if _parquet_is_empty([path]):
            return RawSplit([], None, str(path))
        loaded = _load(reference, datasets.load_dataset, "parquet", data_files=str(path))
        return RawSplit(_split_of(loaded, reference, split), None, str(path))
    if (path / "dataset_dict.json").exists():
        # Only the split asked for: another, empty split must not make this one unreadable.
        splits = _saved_dict_splits(path, reference)
        if split not in splits:
            raise DataError(f"dataset '{reference}': no split '{split}' (have: {_names(splits)})")
        folder = path / split
        if _saved_split_is_empty(folder):
            return RawSplit([], None, str(folder))
        return RawSplit(_load(reference, datasets.load_from_disk, str(folder)), None, str(folder))
    if (path / "state.json").exists():  # one saved Dataset: the split 'train'
        if split != "train":
            raise DataError(f"dataset '{reference}': no split '{split}' (have: train)")
        if _saved_split_is_empty(path):
            return RawSplit([], None, str(path))
        return RawSplit(_load(reference, datasets.load_from_disk, str(path)), None, str(path))
    splits = _folder_splits(path, reference)
    if split not in splits:
        raise DataError(f"dataset '{reference}': no split '{split}' (have: {_names(splits)})")
    files = splits[split]
    source = ", ".join(_shown(file, path) for file in files)
    kinds = sorted({"".join(file.suffixes) for file in files})
    if len(kinds) > 1:  # `datasets` would silently read one kind and ignore the rest
        raise DataError(
            f"dataset '{reference}': split '{split}' mixes data file types ({', '.join(kinds)}) in {path}; keep one"
        )
    if all(file.suffix in JSON_SUFFIXES for file in files):
        parts = [read_json_rows(file, reference, in_folder=True) for file in files]
        return RawSplit(
            [row for part in parts for row in part.rows], [label for part in parts for label in part.labels], source
        )
    if _parquet_is_empty(files):
        return RawSplit([], None, source)
    # Only this split's files: another, empty split must not make this one unreadable.
    loaded = _load(reference, datasets.load_dataset, str(path), data_files={split: [str(file) for file in files]})
    return RawSplit(_split_of(loaded, reference, split), None, source)


def _load(
    reference: str, loader: Callable[..., Any], *args: Any, **kwargs: Any
) -> datasets.Dataset | datasets.DatasetDict:
    """`loader(*args, **kwargs)`; a failure to read is one DataError line (an unreachable hub stays a
    ConnectionError, which the preflight words itself)."""
    try:
        return loader(*args, **kwargs)
    except ConnectionError:
        raise
    except Exception as err:  # malformed files: pyarrow, datasets and OS errors alike
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"dataset '{reference}': cannot be read ({type(err).__name__}: {first_line})") from err


def _split_of(loaded: datasets.Dataset | datasets.DatasetDict, reference: str, split: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if split not in loaded:
        raise DataError(f"dataset '{reference}': no split '{split}' (have: {_names(loaded)})")
    return loaded[split]


# Bad rows listed in the one-line error, before "and N more".
LISTED_BAD_ROWS = 3


def _normalized(raw: RawSplit, normalize, where: str, drop_bad_rows: bool = False) -> datasets.Dataset:
    """Validate every row up front (cheap), so a bad row stops the run before training.

    Bad rows are an error naming them, unless the config drops them explicitly (then logged)."""
    rows, bad = [], []
    for index, row in enumerate(raw.rows):
        try:
            rows.append(normalize(row, raw.label(index)))
        except DataError as err:
            bad.append(str(err))
    total = len(raw.rows)
    if bad and not drop_bad_rows:
        listed = "; ".join(bad[:LISTED_BAD_ROWS]) + (
            f"; and {len(bad) - LISTED_BAD_ROWS} more" if len(bad) > LISTED_BAD_ROWS else ""
        )
        count = f"{len(bad)} bad row{'s' if len(bad) > 1 else ''}"
        raise DataError(f"{where}: {count} of {total}: {listed} (drop_bad_rows: true drops them)")
    if bad:
        log.warning("%s: dropped %d bad rows of %d (drop_bad_rows), first: %s", where, len(bad), total, bad[0])
    if not rows:
        raise DataError(f"{where}: no usable rows")
    return datasets.Dataset.from_list(rows)


def _take(raw: RawSplit, spec: Mapping[str, Any], split: str) -> RawSplit:
    """max_train_rows cuts the training split only: held-out results never depend on a training setting."""
    return raw.head(spec.get("max_train_rows") if split == spec.get("train_split", "train") else None)


def load_sft(spec: Mapping[str, Any], split: str) -> datasets.Dataset:
    where = f"dataset '{spec['path']}' split '{split}'"
    raw = _take(load_split(spec, split), spec, split)
    return _normalized(raw, normalize_sft_row, where, spec.get("drop_bad_rows", False))


def to_prompt_completion(dataset: datasets.Dataset) -> datasets.Dataset:
    """SFT rows as TRL's conversational prompt + completion: every turn before the last assistant turn is the prompt."""
    return dataset.map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=dataset.column_names,
    )


def load_preference(spec: Mapping[str, Any], split: str, keep: Sequence[str] = ()) -> datasets.Dataset:
    """Normalized pairs; `keep` names extra columns carried along (None where a row lacks them)."""
    where = f"dataset '{spec['path']}' split '{split}'"
    raw = _take(load_split(spec, split), spec, split)

    def normalize(row: Mapping[str, Any], row_where: str) -> dict[str, Any]:
        return {**normalize_preference_row(row, row_where), **{column: row.get(column) for column in keep}}

    return _normalized(raw, normalize, where, spec.get("drop_bad_rows", False))
