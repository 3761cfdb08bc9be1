"""Student-pipeline benchmark: one table, everything measured side by side in one run.

Usage:  python bench/student_pipeline.py [--workdir DIR]
DIR is a workflow folder after a finished `snakemake --cores 2` (default: the current folder); it
gives the real student model, the real teacher top-k store and the up-to-date DAG for
`snakemake -n`. Without it the model rows use a SmolLM2-shaped random student.

Rows:
- loss path per batch (load the teacher's top-k + DCKD KL, given the student's log-probs) vs a
  reference-style implementation (top-k as JSONL lists of dicts, a Python loop per token),
  T = 256 and 512, k = 50 (target >= 50x); and the same including the student's log-softmax;
- DCKD and ADPA training step vs a plain SFT step on the same batch and model (target <= 1.15x);
- store bytes per token vs the JSONL form (target <= 6k + 8);
- `snakemake -n` on the full DAG when everything is up to date (target <= 3 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adpa.training.losses import TopKBatch, adpa_loss, dckd_loss, nll_loss, topk_forward_kl, topk_kl_from_logprobs
from adpa.training.topk_store import TopKStore, TopKStoreWriter

VOCAB, K, BATCH = 49152, 50, 4


def timed(function, repeats: int = 3) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def teacher_rows(length: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rows = []
    for _ in range(BATCH):
        ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(length)])
        logprobs = np.sort(np.log(rng.dirichlet(np.ones(K + 1), size=length)), axis=-1)[:, ::-1]
        rows.append((ids, logprobs[:, :K].copy(), logprobs[:, K].copy()))
    return rows


def reference_style_loss(jsonl: Path, student_logprobs: torch.Tensor) -> torch.Tensor:
    """As the reference code: parse lists of dicts, then one Python iteration per token."""
    total = []
    with jsonl.open() as handle:
        for row, line in enumerate(handle):
            tokens = json.loads(line)
            per_token = []
            for t, candidates in enumerate(tokens):
                ids = torch.tensor([c["token_id"] for c in candidates])
                teacher = torch.tensor([c["logprob"] for c in candidates]).exp()
                student = student_logprobs[row, t, ids]
                rest_teacher = (1 - teacher.sum()).clamp(min=1e-8)
                rest_student = (1 - student.exp().sum()).clamp(min=1e-8)
                kl = (teacher * (teacher.log() - student)).sum() + rest_teacher * (
                    rest_teacher.log() - rest_student.log()
                )
                per_token.append(kl)
            total.append(torch.stack(per_token).mean())
    return torch.stack(total).mean()


def loss_path_rows(rng: np.random.Generator) -> list[list[str]]:
    table = []
    for length in (256, 512):
        rows = teacher_rows(length, rng)
        with tempfile.TemporaryDirectory() as folder:
            store_dir, jsonl = Path(folder, "store"), Path(folder, "topk.jsonl")
            with TopKStoreWriter(store_dir, K, VOCAB) as writer:
                for ids, logprobs, rest in rows:
                    writer.append(ids, logprobs, rest)
            with jsonl.open("w") as handle:
                for ids, logprobs, _ in rows:
                    handle.write(
                        json.dumps(
                            [
                                [{"token_id": int(i), "logprob": float(p)} for i, p in zip(r_ids, r_lp)]
                                for r_ids, r_lp in zip(ids, logprobs)
                            ]
                        )
                        + "\n"
                    )
            logits = torch.randn(BATCH, length, VOCAB)
            mask = torch.ones(BATCH, length, dtype=torch.bool)
            # The student's log-softmax is the forward pass's output, shared with the NLL of every
            # method; the teacher path is what differs: read the teacher's top-k and compute the KL.
            student_logprobs = torch.log_softmax(logits, dim=-1)

            def teacher_path():
                batch = TopKStore(store_dir).padded_batch(range(BATCH))
                student_topk = student_logprobs.gather(-1, batch["ids"])
                topk = TopKBatch(batch["ids"], batch["values"], batch["rest"])
                return topk_kl_from_logprobs(student_topk, topk, mask)

            def end_to_end():
                batch = TopKStore(store_dir).padded_batch(range(BATCH))
                return topk_forward_kl(logits, TopKBatch(batch["ids"], batch["values"], batch["rest"]), mask)

            ours_s = timed(teacher_path, repeats=10)
            reference_s = timed(lambda: reference_style_loss(jsonl, student_logprobs), repeats=1)
            ratio = reference_s / ours_s
            table.append(
                [
                    f"teacher data + KL per batch, B={BATCH} T={length} k={K}",
                    f"{ours_s * 1e3:.1f} ms",
                    f"{reference_s * 1e3:.0f} ms (JSONL + loop)",
                    f"{ratio:.0f}x faster",
                    ">= 50x",
                    ratio >= 50,
                ]
            )
            full_s = timed(end_to_end)
            full_reference_s = reference_s + timed(lambda: torch.log_softmax(logits, dim=-1))
            table.append(
                [
                    f"  same, incl. the student's log-softmax over V={VOCAB}",
                    f"{full_s * 1e3:.0f} ms",
                    f"{full_reference_s * 1e3:.0f} ms",
                    f"{full_reference_s / full_s:.1f}x faster",
                    "",
                    "",
                ]
            )
            store_bytes = sum(path.stat().st_size for path in store_dir.iterdir()) / TopKStore(store_dir).num_tokens
            jsonl_bytes = jsonl.stat().st_size / (BATCH * length)
            if length == 512:
                table.append(
                    [
                        f"store bytes/token, k={K}",
                        f"{store_bytes:.0f} B",
                        f"{jsonl_bytes:.0f} B (JSONL)",
                        f"{jsonl_bytes / store_bytes:.0f}x smaller",
                        f"<= {6 * K + 8} B",
                        store_bytes <= 6 * K + 8,
                    ]
                )
    return table


def student_model(workdir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = next(iter(sorted((workdir / "results").glob("seed*/student_sft"))), workdir / "results" / "student_sft")
    if folder.is_dir():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), "student_sft"
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=10,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config), "random SmolLM2-shaped 10-layer student"


def step_rows(workdir: Path, rng: np.random.Generator) -> list[list[str]]:
    model, name = student_model(workdir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    length, pairs = 128, BATCH
    input_ids = torch.randint(0, VOCAB, (2 * pairs, length))
    mask = torch.zeros(2 * pairs, length - 1, dtype=torch.bool)
    mask[:, 40:] = True  # response tokens after a 40-token prompt
    ids = torch.from_numpy(np.stack([rng.choice(VOCAB, (length - 1, K)) for _ in range(2 * pairs)])).long()
    values = torch.log_softmax(torch.randn(2 * pairs, length - 1, K + 1), -1)
    topk_values, rest = values[..., :K], values[..., K]
    advantage = torch.randn(2 * pairs, length - 1, K)
    chosen, other = slice(0, pairs), slice(pairs, None)  # other: the rejected (DCKD) or own (ADPA) response

    def step(objective: str):
        logits = model(input_ids=input_ids).logits[:, :-1]
        labels = input_ids[:, 1:]
        if objective == "sft":
            loss = nll_loss(logits, labels, mask)
        elif objective == "dckd":
            loss = dckd_loss(
                chosen_logits=logits[chosen],
                chosen_labels=labels[chosen],
                chosen_mask=mask[chosen],
                chosen_topk=TopKBatch(ids[chosen], topk_values[chosen], rest[chosen]),
                rejected_logits=logits[other],
                rejected_mask=mask[other],
                rejected_topk=TopKBatch(ids[other], topk_values[other], rest[other]),
                nll_weight=1.0,
                chosen_kl_weight=0.1,
                rejected_kl_weight=0.1,
            )
        else:
            loss = adpa_loss(
                chosen_logits=logits[chosen],
                chosen_labels=labels[chosen],
                chosen_mask=mask[chosen],
                own_logits=logits[other],
                own_mask=mask[other],
                own_advantage=TopKBatch(ids[other], advantage[other]),
                adpa_weight=1.6,
                nll_weight=1.0,
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = {objective: timed(lambda: step(objective), repeats=3) for objective in ("sft", "dckd", "adpa")}
    return [
        [
            f"{objective.upper()} step vs SFT step ({name}, {2 * pairs}x{length})",
            f"{seconds[objective]:.2f} s",
            f"{seconds['sft']:.2f} s (SFT)",
            f"{seconds[objective] / seconds['sft']:.2f}x",
            "<= 1.15x",
            seconds[objective] / seconds["sft"] <= 1.15,
        ]
        for objective in ("dckd", "adpa")
    ]


def dry_run_row(workdir: Path) -> list[list[str]]:
    if not (workdir / "results" / "summary.csv").is_file():
        return [["snakemake -n, full DAG up to date", "not run", "(no finished run in --workdir)", "", "<= 3 s", ""]]
    command = [sys.executable, "-m", "snakemake", "-n", "--cores", "2"]
    subprocess.run(command, cwd=workdir, capture_output=True, check=True)  # warm file caches
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    nothing = "Nothing to be done" in result.stdout + result.stderr
    return [
        [
            "snakemake -n, full DAG up to date",
            f"{seconds:.2f} s",
            "nothing to do" if nothing else "JOBS PLANNED",
            "",
            "<= 3 s",
            seconds <= 3 and nothing,
        ]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = loss_path_rows(rng) + step_rows(args.workdir, rng) + dry_run_row(args.workdir)
    print("| measurement | ours | baseline | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        met = {True: "yes", False: "NO", "": ""}[row[-1]] if row[-1] != "" else ""
        print("| " + " | ".join([*map(str, row[:-1]), met]) + " |")


if __name__ == "__main__":
    main()
