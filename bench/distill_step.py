"""Distillation training steps at the embedded default's student shape, for a side-by-side of two
checkouts of adpa (the loss path of `DistillationTrainer.compute_loss`, forward and backward).

Usage (nothing else on the cores):
    python bench/distill_step.py [--objective dckd] [--steps 6] [--chunk N]
    PYTHONPATH=/path/to/other/checkout python bench/distill_step.py ...   # the same steps on other code

The student: SmolLM2-135M's blocks cut to 10 layers (hidden 576, 9 heads, 3 KV heads, intermediate
1536, vocabulary 49152, tied head; 63.7M parameters) with random weights; a batch as the embedded
default's collator makes it (16 pairs, prompts of 60 tokens, responses of 10-90 tokens; top-k 50).
Prints the median seconds of a step after one warm-up step, the loss, the CPU and the code's folder.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch

ROWS, PROMPT, K, VOCAB = 16, 60, 50, 49152


def student():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=10,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).float()


def batch(sequences: int) -> dict[str, torch.Tensor]:
    """The collator's keys for `sequences` x ROWS sequences, padded on the right."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(10, 90, (sequences * ROWS,), generator=generator)
    width, longest = PROMPT + int(lengths.max()), int(lengths.max())
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    attention = (torch.arange(width)[None] < (PROMPT + lengths)[:, None]).long()
    mask = torch.arange(longest)[None] < lengths[:, None]
    positions = torch.where(mask, PROMPT - 1 + torch.arange(longest)[None], 0)
    labels = torch.where(mask, ids.gather(1, (positions + 1).clamp(max=width - 1)), 0)
    values = torch.log_softmax(torch.randn(len(lengths), longest, K, generator=generator), -1) - 0.1
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "logit_positions": positions,
        "labels": labels,
        "response_mask": mask,
        "topk_ids": torch.randint(0, VOCAB, (len(lengths), longest, K), generator=generator),
        "topk_values": values,
        "topk_rest": torch.log1p(-values.exp().sum(-1).clamp(max=0.99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="dckd", choices=["dckd", "adpa", "vanilla_kd"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--chunk", type=int, help="loss_chunk_tokens (code that has it; default: its own)")
    args = parser.parse_args()

    from transformers import TrainingArguments

    import adpa.training.distill as distill
    from adpa.modeling.precision import cpu_flags

    torch.set_num_threads(2)
    weights = {
        "dckd": {"nll_weight": 1.0, "chosen_kl_weight": 1.0, "rejected_kl_weight": 1.0},
        "adpa": {"nll_weight": 1.0, "adpa_weight": 1.0},
        "vanilla_kd": {"nll_weight": 1.0, "kl_weight": 1.0},
    }[args.objective]
    trainer_class = distill._distillation_trainer_class()
    extra = {}
    if args.chunk is not None and "loss_chunk_tokens" in inspect.signature(trainer_class.__init__).parameters:
        extra["loss_chunk_tokens"] = args.chunk
    model = student()
    training = TrainingArguments(output_dir="/tmp/distill-step", use_cpu=True, report_to="none")
    trainer = trainer_class(model=model, args=training, objective=args.objective, weights=weights, **extra)
    try:
        from adpa.dag.objectives import sequences_of

        inputs = batch(len(sequences_of(args.objective)))
    except ImportError:  # a checkout from before adpa/dag/objectives.py
        inputs = batch(len(distill.SEQUENCES[args.objective]))
    seconds, loss = [], None
    for step in range(args.steps + 1):
        started = time.perf_counter()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            seconds.append(time.perf_counter() - started)
    flags = sorted(flag for flag in cpu_flags() if flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    print(
        f"{args.objective}: median {statistics.median(seconds):.3f} s per step (min {min(seconds):.3f}, max "
        f"{max(seconds):.3f}, {len(seconds)} steps), loss {float(loss):.6f}; code {distill.__file__}; "
        f"CPU flags {' '.join(flags)}"
    )


if __name__ == "__main__":
    main()
