"""The top-k store: exact round trip, compact on disk, incomplete stores unreadable, memory-mapped reads."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from adpa.training.topk_store import TopKStore, TopKStoreWriter

# Readers only the tests need; the trainer reads whole batches with TopKStore.padded_batch.


def read_row(store: TopKStore, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids [T,k], values [T,k] fp16, rest [T] fp16 or None) as read-only views into the files."""
    s, e = store.row_span(i)
    return store.ids[s:e], store.values[s:e], (store.rest[s:e] if store.rest is not None else None)


def row_logprobs(store: TopKStore, i: int) -> np.ndarray:
    if store.kind != "topk_logprobs":
        raise ValueError(f"store {store.directory} holds {store.kind!r} rows, not log-probs")
    return read_row(store, i)[1]


def row_advantages(store: TopKStore, i: int) -> np.ndarray:
    if store.kind != "advantage":
        raise ValueError(f"store {store.directory} holds {store.kind!r} rows, not advantages")
    return read_row(store, i)[1]


def row_tensors(store: TopKStore, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ids int64 for gather, values float32, rest float32 or None); copies, so writable."""
    ids, values, rest = read_row(store, i)
    return (
        torch.from_numpy(ids.astype(np.int64)),
        torch.from_numpy(values.astype(np.float32)),
        torch.from_numpy(rest.astype(np.float32)) if rest is not None else None,
    )


def bytes_per_token(store: TopKStore) -> float:
    total = sum(
        path.stat().st_size
        for path in store.directory.iterdir()
        if path.name in ("ids.bin", "values.bin", "rest.bin", "offsets.npy", "meta.json")
    )
    return total / store.num_tokens if store.num_tokens else math.inf


def reference_jsonl_bytes_per_token(ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray]) -> float:
    """Bytes/token of the reference ADPA format: per row one JSON line, a list (per token) of
    lists of {"token_id": int, "logprob": float} dicts. `ids`/`logprobs` are sequences of [T, k] rows."""
    total_bytes = total_tokens = 0
    for row_ids, row_lp in zip(ids, logprobs, strict=True):
        id_list, lp_list = np.asarray(row_ids).tolist(), np.asarray(row_lp).tolist()
        line = json.dumps(
            [[{"token_id": t, "logprob": lp} for t, lp in zip(ti, tl)] for ti, tl in zip(id_list, lp_list)]
        )
        total_bytes += len(line.encode()) + 1
        total_tokens += len(id_list)
    return total_bytes / total_tokens if total_tokens else math.inf


def make_row(rng: np.random.Generator, t: int, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = rng.normal(size=(t, k)).astype(np.float32) * 3
    logprobs = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.5), axis=-1)[:, ::-1]
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(t)]) if t else np.zeros((0, k), np.int64)
    rest = np.log1p(-np.exp(logprobs).sum(-1)).astype(np.float32)
    return ids, np.ascontiguousarray(logprobs), rest


def write_store(path, rows, k: int, vocab: int, **kwargs) -> None:
    with TopKStoreWriter(path, k=k, vocab_size=vocab, **kwargs) as writer:
        for row in rows:
            writer.append(*row)


def test_round_trip_with_empty_rows_and_inf_rest(tmp_path):
    rng = np.random.default_rng(0)
    k, vocab = 5, 49152
    rows = [make_row(rng, t, k, vocab) for t in (3, 0, 7, 1)]
    rows[2][2][4] = -np.inf  # all probability mass in the top-k
    rows[2][1][0, -1] = -np.inf
    # torch input is accepted as well as numpy
    rows[3] = tuple(torch.from_numpy(x) for x in rows[3])
    write_store(tmp_path / "s", rows, k, vocab)

    store = TopKStore(tmp_path / "s")
    assert len(store) == 4 and store.num_tokens == 11 and store.k == k and store.kind == "topk_logprobs"
    assert store.lengths.tolist() == [3, 0, 7, 1]
    for i, (ids, lp, rest) in enumerate(rows):
        ids, lp, rest = (np.asarray(x) for x in (ids, lp, rest))
        got_ids, got_values, got_rest = read_row(store, i)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_values, lp.astype(np.float16))
        np.testing.assert_array_equal(got_rest, rest.astype(np.float16))
    assert read_row(store, 2)[2][4] == -np.inf and read_row(store, 2)[1][0, -1] == -np.inf
    np.testing.assert_array_equal(row_logprobs(store, -1), read_row(store, 3)[1])
    assert read_row(store, 1)[0].shape == (0, k)
    with pytest.raises(IndexError):
        read_row(store, 4)

    t_ids, t_values, t_rest = row_tensors(store, 0)
    assert t_ids.dtype == torch.int64 and t_values.dtype == torch.float32 and t_rest.dtype == torch.float32
    assert torch.equal(t_ids, torch.from_numpy(rows[0][0]).long())
    assert torch.equal(t_values, torch.from_numpy(rows[0][1].astype(np.float16).astype(np.float32)))


def test_id_dtype_and_range_check(tmp_path):
    rng = np.random.default_rng(1)
    for vocab, dtype, nbytes in ((49152, np.uint16, 2), (128256, np.int32, 4)):
        path = tmp_path / str(vocab)
        ids = np.array([[vocab - 1, 70000 % vocab], [0, 1]])
        write_store(path, [(ids, rng.normal(size=(2, 2)), np.zeros(2))], 2, vocab)
        store = TopKStore(path)
        assert read_row(store, 0)[0].dtype == dtype and (path / "ids.bin").stat().st_size == 4 * nbytes
        np.testing.assert_array_equal(read_row(store, 0)[0], ids)

    with TopKStoreWriter(tmp_path / "bad", k=2, vocab_size=49152) as writer:
        writer.append(np.zeros((1, 2), np.int64), np.zeros((1, 2)), np.zeros(1))
        with pytest.raises(ValueError, match=r"row 1: token ids must lie in \[0, 49152\)"):
            writer.append(np.array([[0, 49152]]), np.zeros((1, 2)), np.zeros(1))
        with pytest.raises(ValueError, match="row 1:.*shape"):
            writer.append(np.zeros((2, 3), np.int64), np.zeros((2, 3)), np.zeros(2))
        with pytest.raises(ValueError, match="row 1: rest"):
            writer.append(np.zeros((2, 2), np.int64), np.zeros((2, 2)))
        with pytest.raises(ValueError, match="row 1:.*integers"):
            writer.append(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(2))
    assert len(TopKStore(tmp_path / "bad")) == 1


def test_compact_on_disk_and_far_below_jsonl(tmp_path):
    rng = np.random.default_rng(2)
    k, vocab = 50, 49152
    lengths = rng.integers(20, 301, size=100)
    # Rows are generated and written one at a time, as the teacher would produce them.
    sample_ids, sample_lp = [], []
    with TopKStoreWriter(tmp_path / "s", k=k, vocab_size=vocab, metadata={"teacher": "t"}) as writer:
        for i, t in enumerate(lengths):
            ids = rng.integers(0, vocab, size=(t, k))
            lp = -np.abs(rng.normal(size=(t, k)) * 4).astype(np.float32)
            writer.append(ids, lp, np.full(t, -2.5, np.float32))
            if i < 10:
                sample_ids.append(ids)
                sample_lp.append(lp)
    store = TopKStore(tmp_path / "s")
    assert store.num_tokens == lengths.sum()
    assert 4 * k + 2 < bytes_per_token(store) <= 6 * k + 8
    jsonl = reference_jsonl_bytes_per_token(sample_ids, sample_lp)
    assert jsonl > 10 * bytes_per_token(store)


def test_incomplete_store_cannot_be_opened(tmp_path):
    path = tmp_path / "s"
    rng = np.random.default_rng(3)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with TopKStoreWriter(path, k=4, vocab_size=100) as writer:
            writer.append(*make_row(rng, 5, 4, 100))
            raise RuntimeError("teacher crashed")
    assert (path / "ids.bin").stat().st_size > 0 and not (path / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        TopKStore(path)

    # Rewriting a complete store un-marks it until the new writer closes.
    write_store(path, [make_row(rng, 5, 4, 100)], 4, 100)
    writer = TopKStoreWriter(path, k=4, vocab_size=100)
    with pytest.raises(FileNotFoundError):
        TopKStore(path)
    writer.close()
    assert len(TopKStore(path)) == 0

    write_store(path, [make_row(rng, 5, 4, 100)], 4, 100)
    with open(path / "values.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="inconsistent store: .*values.bin"):
        TopKStore(path)


def test_reader_is_memory_mapped(tmp_path):
    rng = np.random.default_rng(4)
    write_store(tmp_path / "s", [make_row(rng, t, 3, 500) for t in (4, 6)], 3, 500)
    store = TopKStore(tmp_path / "s")
    assert isinstance(store.ids, np.memmap) and isinstance(store.values, np.memmap)
    assert isinstance(store.rest, np.memmap)
    ids, values, _ = read_row(store, 1)
    assert isinstance(ids, np.memmap) and not values.flags.writeable


def test_padded_batch(tmp_path):
    rng = np.random.default_rng(5)
    rows = [make_row(rng, t, 3, 500) for t in (4, 0, 6)]
    write_store(tmp_path / "s", rows, 3, 500)
    store = TopKStore(tmp_path / "s")

    batch = store.padded_batch([2, 1, 0])
    assert batch["ids"].shape == (3, 6, 3) and batch["ids"].dtype == torch.int64
    assert batch["values"].shape == (3, 6, 3) and batch["values"].dtype == torch.float32
    assert batch["rest"].shape == (3, 6) and batch["mask"].dtype == torch.bool
    assert batch["mask"].sum(1).tolist() == [6, 0, 4]
    assert torch.equal(batch["ids"][2, :4], torch.from_numpy(rows[0][0]).long())
    assert torch.equal(batch["values"][0], row_tensors(store, 2)[1])
    pad = ~batch["mask"]
    assert (batch["ids"][pad] == 0).all() and (batch["values"][pad] == 0).all() and (batch["rest"][pad] == 0).all()

    short = store.padded_batch([0, 2], length=5)
    assert short["ids"].shape == (2, 5, 3) and short["mask"].sum(1).tolist() == [4, 5]
    assert torch.equal(short["values"][1], row_tensors(store, 2)[1][:5])
    assert torch.equal(short["rest"][0, :4], row_tensors(store, 0)[2])
    assert store.padded_batch([1], length=8)["mask"].shape == (1, 8)
    assert store.padded_batch([])["ids"].shape == (0, 0, 3)


def test_advantage_store_without_rest_and_metadata(tmp_path):
    meta = {"teacher": "dpo-teacher", "reference": "sft-teacher", "data": {"split": "train", "n": 2}}
    adv = np.array([[0.5, -1.25], [3.0, -0.001]], np.float32)
    with TopKStoreWriter(
        tmp_path / "a", k=2, vocab_size=32000, kind="advantage", has_rest=False, metadata=meta
    ) as writer:
        writer.append(torch.tensor([[1, 2], [3, 4]]), torch.from_numpy(adv).bfloat16())
        with pytest.raises(ValueError, match="row 1: rest given"):
            writer.append(np.zeros((1, 2), np.int64), np.zeros((1, 2)), np.zeros(1))
    store = TopKStore(tmp_path / "a")
    assert store.kind == "advantage" and not store.has_rest and store.metadata == meta
    assert not (tmp_path / "a" / "rest.bin").exists()
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["rows"] == 1
    ids, values, rest = read_row(store, 0)
    assert rest is None and row_tensors(store, 0)[2] is None and "rest" not in store.padded_batch([0])
    np.testing.assert_allclose(row_advantages(store, 0), adv, rtol=1e-2)
    with pytest.raises(ValueError, match="not log-probs"):
        row_logprobs(store, 0)
    with pytest.raises(ValueError, match="kind"):
        TopKStoreWriter(tmp_path / "b", k=2, vocab_size=10, kind="logits")
