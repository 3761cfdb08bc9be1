"""The LM head projected at the positions a stage needs, not at every position.

A response is ~10% of a row's tokens in the embedded default, and the head of a small model is a
large share of its forward (SmolLM2's 49152 x 576 projection: ~20% of the 135M teacher's FLOPs,
~45% of the 64M student's), followed by a softmax over the vocabulary at every projected position.

- `positions_logits`: logits at given positions [B, R] (the inference stages and evaluation).
- `dense_lm_head` patches `model.forward` (so DDP and DeepSpeed engines still run it) for two calls:
  TRL 1.16's SFT and DPO trainers' `fused_lm_head=True`, which TRL serves with a tiled fp32
  projection with its own autograd (2.3x slower per CPU step than the model's own forward), served
  here by one matmul over the labelled positions under the run's autocast, so the trainers, their
  losses and their metrics stay TRL's; and the distillation trainer's `logit_positions=[B, R]`, with
  `reduce_logit_positions`: the hidden states there and the head go to a function run inside the
  forward (`sum_over_position_chunks`: the head projects a chunk of positions at a time).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from transformers.utils import ModelOutput

# Models whose heads scale or cap the logits keep TRL's head, which knows how.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


# One projection's fp32 logits at most (1 GiB; the log-softmax and its gradient hold as many again):
# above it the SFT and DPO batches go to TRL's tiled head (SmolLM2's head at 16 x 200 tokens is
# 0.16e9 here, one packed batch of 8 x 2048 tokens 0.8e9). Bounded by all positions, labelled or
# not, so that no device sync decides it.
DENSE_HEAD_MAX_LOGITS = 2**28


def supports_dense_head(model) -> bool:
    config = model.config.get_text_config()
    return all(getattr(config, name, None) in (None, 1.0) for name in _LOGIT_TRANSFORMS)


def _gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [B, L, D] at positions [B, R] of the sequence axis -> [B, R, D]; or, for a padding-free
    batch (its rows packed into one, sequences.pack_exchanges), values [1, N, D] at positions [S, R]
    into the flat axis -> [S, R, D]. A one-row batch reads the same either way."""
    if values.shape[0] == 1:
        return values[0][positions]
    return values.gather(1, positions[..., None].expand(-1, -1, values.shape[-1]))


def positions_logits(model, positions: torch.Tensor, **inputs) -> tuple[torch.Tensor, ModelOutput]:
    """The logits [B, R, V] at `positions` [B, R] of the sequence axis, and the decoder's output (its
    `cache` where `use_cache`). The head projects those positions only; a head that transforms its
    logits (`supports_dense_head` False) runs the model's own forward and is gathered from. A
    padding-free batch (input_ids and position_ids [1, N], no attention_mask) gives [S, R, V] for
    positions [S, R] into its flat axis (`_gather_positions`)."""
    if not supports_dense_head(model):
        output = model(**inputs)
        return _gather_positions(output.logits, positions), output
    output = getattr(model, model.base_model_prefix)(**inputs)
    return model.get_output_embeddings()(_gather_positions(output.last_hidden_state, positions)), output


def _chunks_of_all_ranks(chunks: int, device: torch.device) -> int:
    """The largest chunk count of any rank (this rank's without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return chunks
    count = torch.tensor([chunks], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def sum_over_position_chunks(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_sums: Callable[[torch.Tensor, slice], Mapping[str, torch.Tensor]],
    chunk_positions: int,
) -> dict[str, torch.Tensor]:
    """`chunk_sums(head(hidden[:, span]), span)` added up over spans of `chunk_positions` positions of
    hidden [B, R, H] (e.g. the hidden states at a batch's logit positions), key by key.

    So the logits [B, R, V] never exist at once (256 MB per 2048-token row at a 32k vocabulary in
    float32): each chunk runs under activation checkpointing, which keeps its input, not its logits,
    for the backward and recomputes them there, one chunk at a time. R <= chunk_positions is one
    plain call: no recomputation, the same compute as projecting all positions.

    Every rank makes as many chunks as the rank with the most positions (empty ones at the end):
    under ZeRO-3 each call of the head gathers its weight with all ranks, so unequal counts hang.
    """
    length = hidden.shape[1]
    chunks = _chunks_of_all_ranks(-(-length // chunk_positions), hidden.device)
    if chunks <= 1:
        return dict(chunk_sums(head(hidden), slice(0, length)))

    def project(chunk: torch.Tensor, span: slice) -> Mapping[str, torch.Tensor]:
        return chunk_sums(head(chunk), span)

    total: dict[str, torch.Tensor] = {}
    # split, not slicing: its backward assembles the chunks' gradients once instead of one [B, R, H] each
    pieces = list(hidden.split(chunk_positions, dim=1))
    pieces += [hidden[:, length:]] * (chunks - len(pieces))  # empty: this rank has fewer positions
    for index, chunk in enumerate(pieces):
        start = min(index * chunk_positions, length)
        span = slice(start, start + chunk.shape[1])
        # The head and the loss terms draw no random numbers: no RNG state to keep for the recomputation.
        sums = checkpoint(project, chunk, span, use_reentrant=False, preserve_rng_state=False)
        total = {name: total[name] + value if name in total else value for name, value in sums.items()}
    return total


def dense_lm_head(model) -> bool:
    """Patch `model.forward` so that `fused_lm_head=True` returns TRL's FusedCausalLMOutput from one
    dense projection of the positions whose label is not -100, and `logit_positions=[B, R]` returns
    the logits [B, R, V] at those positions (`positions_logits`), or, given `reduce_logit_positions`,
    what it returns for the hidden states [B, R, H] there and the output head module: run inside the
    forward, the head runs under the forward's autocast, DeepSpeed's parameter gathering (a module
    call) and DDP's view of the graph. Returns False (nothing patched) for heads that transform their
    logits."""
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # Under DeepSpeed the DPO reference arrives wrapped in its engine, which calls the module's forward;
    # a LoRA model (peft) calls its base model's forward, which is patched as TRL patches it.
    while not isinstance(model, PreTrainedModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, PreTrainedModel) and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not supports_dense_head(model):
        return False
    original_forward = type(model).forward
    # TRL's tiled head, where a trainer added one: it serves the batches too large for one projection.
    tiled_forward = model.__dict__.get("forward")

    def forward(
        self,
        *args,
        fused_lm_head=False,
        logit_positions=None,
        reduce_logit_positions=None,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        if logit_positions is not None:
            kwargs.update(zip(("input_ids", "attention_mask"), args), use_cache=False)
            if reduce_logit_positions is not None:
                hidden = getattr(self, self.base_model_prefix)(**kwargs).last_hidden_state
                return reduce_logit_positions(_gather_positions(hidden, logit_positions), self.get_output_embeddings())
            return CausalLMOutputWithPast(logits=positions_logits(self, logit_positions, **kwargs)[0])
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            kwargs.update({key: value for key, value in extra.items() if value is not None})
            return original_forward(self, *args, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput  # only TRL's trainers ask for it

        if tiled_forward is not None and labels is not None:
            positions = (shift_labels if shift_labels is not None else labels).numel()
            if positions * self.config.get_text_config().vocab_size > DENSE_HEAD_MAX_LOGITS:
                return tiled_forward(
                    *args,
                    fused_lm_head=True,
                    labels=labels,
                    shift_labels=shift_labels,
                    num_items_in_batch=num_items_in_batch,
                    **kwargs,
                )
        kwargs["use_cache"] = False
        hidden = getattr(self, self.base_model_prefix)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        targets = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()  # [N, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        with torch.no_grad():
            probs = logprobs.exp()
            entropy = -(probs * logprobs).sum(-1)
            is_top1 = logprobs.argmax(-1) == targets
            mean_logits = logits.mean(-1)
            log_sum_sq_probs = torch.logsumexp(2 * logprobs, -1)

        def spread(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        log_probs = spread(chosen)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=spread(entropy),
            log_sum_sq_probs=spread(log_sum_sq_probs),
            mean_logits=spread(mean_logits),
            is_top1=spread(is_top1),
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    return True
