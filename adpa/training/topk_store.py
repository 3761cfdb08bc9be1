"""Compact on-disk store of per-token top-k teacher values (log-probs or advantages).

A store is a directory holding one row per example response of T tokens:

    ids.bin      [tokens, k]  uint16 (vocab <= 65536) or int32, little-endian
    values.bin   [tokens, k]  float16: log-probs ("topk_logprobs") or advantages ("advantage")
    rest.bin     [tokens]     float16 log(1 - sum of the k probs), may be -inf (only if has_rest)
    offsets.npy  [rows + 1]   int64 token offsets of the rows
    meta.json    written last: its presence marks the store complete

The writer streams rows to the open files; the reader memory-maps them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

FORMAT = "adpa-topk-store"
VERSION = 1
KINDS = ("topk_logprobs", "advantage")
IDS_FILE, VALUES_FILE, REST_FILE, OFFSETS_FILE, META_FILE = (
    "ids.bin",
    "values.bin",
    "rest.bin",
    "offsets.npy",
    "meta.json",
)
# Explicit little-endian so a store written on one machine reads the same on another.
VALUE_DTYPE = np.dtype("<f2")


def id_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def _to_numpy(x: Any, dtype: type | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # bf16 has no numpy equivalent
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


class TopKStoreWriter:
    """Appends rows to a new store; `close()` makes it readable, an exception inside `with` does not."""

    def __init__(
        self,
        directory: str | os.PathLike,
        k: int,
        vocab_size: int,
        kind: str = "topk_logprobs",
        has_rest: bool = True,
        metadata: dict | None = None,
    ) -> None:
        if k <= 0 or vocab_size <= 0:
            raise ValueError(f"k and vocab_size must be positive, got k={k}, vocab_size={vocab_size}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # fail now, not after the teacher has run
        self.directory = Path(directory)
        self.k, self.vocab_size, self.kind, self.has_rest = k, vocab_size, kind, has_rest
        self.id_dtype = id_dtype_for(vocab_size)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Remove the marker first: rewriting an old store must not leave it looking complete.
        for name in (META_FILE, OFFSETS_FILE, REST_FILE):
            (self.directory / name).unlink(missing_ok=True)
        self._ids = open(self.directory / IDS_FILE, "wb")
        self._values = open(self.directory / VALUES_FILE, "wb")
        self._rest = open(self.directory / REST_FILE, "wb") if has_rest else None
        self._offsets = [0]
        self._closed = False

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def append(self, ids: Any, values: Any, rest: Any = None) -> None:
        if self._closed:
            raise ValueError(f"store writer for {self.directory} is closed")
        row = len(self)
        ids_np = _to_numpy(ids)
        values_np = _to_numpy(values, np.float32)
        if ids_np.ndim != 2 or ids_np.shape[1] != self.k:
            raise ValueError(f"row {row}: ids must have shape [T, {self.k}], got {list(ids_np.shape)}")
        n = ids_np.shape[0]
        if values_np.shape != ids_np.shape:
            raise ValueError(f"row {row}: values shape {list(values_np.shape)} != ids shape {list(ids_np.shape)}")
        if n and not np.issubdtype(ids_np.dtype, np.integer):
            raise ValueError(f"row {row}: ids must be integers, got dtype {ids_np.dtype}")
        if n and (ids_np.min() < 0 or ids_np.max() >= self.vocab_size):
            raise ValueError(
                f"row {row}: token ids must lie in [0, {self.vocab_size}), got range [{ids_np.min()}, {ids_np.max()}]"
            )
        if np.isnan(values_np).any():
            raise ValueError(f"row {row}: values contain NaN")
        if self.has_rest:
            if rest is None:
                raise ValueError(f"row {row}: rest [T] is required (store has has_rest=True)")
            rest_np = _to_numpy(rest, np.float32)
            if rest_np.shape != (n,):
                raise ValueError(f"row {row}: rest must have shape [{n}], got {list(rest_np.shape)}")
            if np.isnan(rest_np).any():
                raise ValueError(f"row {row}: rest contains NaN")
        elif rest is not None:
            raise ValueError(f"row {row}: rest given but the store has has_rest=False")
        self._ids.write(np.ascontiguousarray(ids_np, dtype=self.id_dtype).tobytes())
        self._values.write(np.ascontiguousarray(values_np, dtype=VALUE_DTYPE).tobytes())
        if self._rest is not None:
            self._rest.write(np.ascontiguousarray(rest_np, dtype=VALUE_DTYPE).tobytes())
        self._offsets.append(self._offsets[-1] + n)

    def _close_files(self) -> None:
        for f in (self._ids, self._values, self._rest):
            if f is not None and not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._closed = True

    def close(self) -> None:
        if self._closed:
            return
        self._close_files()
        np.save(self.directory / OFFSETS_FILE, np.asarray(self._offsets, dtype="<i8"))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "id_dtype": self.id_dtype.str,
            "value_dtype": VALUE_DTYPE.str,
            "rows": len(self),
            "tokens": self._offsets[-1],
            "has_rest": self.has_rest,
            "metadata": self.metadata,
        }
        tmp = self.directory / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, self.directory / META_FILE)  # atomic: meta.json is all there or absent

    def __enter__(self) -> TopKStoreWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()


def _map(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    size = path.stat().st_size if path.exists() else -1
    if size != expected:
        raise ValueError(f"inconsistent store: {path} has {size} bytes, meta.json implies {expected}")
    if expected == 0:  # np.memmap cannot map an empty file
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class TopKStore:
    """Read-only, memory-mapped view of a complete store."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no complete top-k store at {self.directory}: {META_FILE} is missing (the writer did not finish)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: not a {FORMAT} v{VERSION} store")
        self.meta = meta
        self.k: int = meta["k"]
        self.vocab_size: int = meta["vocab_size"]
        self.kind: str = meta["kind"]
        self.has_rest: bool = meta["has_rest"]
        self.metadata: dict = meta["metadata"]
        self.num_tokens: int = meta["tokens"]
        rows = meta["rows"]
        self.offsets = np.load(self.directory / OFFSETS_FILE, mmap_mode="r")
        if self.offsets.shape != (rows + 1,) or self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens:
            raise ValueError(
                f"inconsistent store: {self.directory / OFFSETS_FILE} does not match "
                f"{rows} rows / {self.num_tokens} tokens in {META_FILE}"
            )
        shape = (self.num_tokens, self.k)
        self.ids = _map(self.directory / IDS_FILE, np.dtype(meta["id_dtype"]), shape)
        self.values = _map(self.directory / VALUES_FILE, np.dtype(meta["value_dtype"]), shape)
        self.rest = (
            _map(self.directory / REST_FILE, np.dtype(meta["value_dtype"]), (self.num_tokens,))
            if self.has_rest
            else None
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row_span(self, i: int) -> tuple[int, int]:
        """Token offsets [start, end) of row i (negative i counts from the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a store of {n} rows")
        i %= n
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def padded_batch(self, indices: Sequence[int], length: int | None = None) -> dict[str, torch.Tensor]:
        """Rows padded (ids 0, values 0, rest 0, mask False) to [B, L, k]; `length` pads or keeps the first L."""
        spans = [self.row_span(i) for i in indices]
        lengths = np.array([e - s for s, e in spans], dtype=np.int64)
        if length is None:
            length = int(lengths.max(initial=0))
        elif length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        lengths = np.minimum(lengths, length)
        b = len(spans)
        ids = np.zeros((b, length, self.k), np.int64)
        values = np.zeros((b, length, self.k), np.float32)
        rest = np.zeros((b, length), np.float32) if self.rest is not None else None
        for row, ((s, _), n) in enumerate(zip(spans, lengths)):
            ids[row, :n] = self.ids[s : s + n]
            values[row, :n] = self.values[s : s + n]
            if rest is not None:
                rest[row, :n] = self.rest[s : s + n]
        batch = {
            "ids": torch.from_numpy(ids),
            "values": torch.from_numpy(values),
            "mask": torch.arange(length)[None, :] < torch.from_numpy(lengths)[:, None],
        }
        if rest is not None:
            batch["rest"] = torch.from_numpy(rest)
        return batch
