"""The LM head projected at the positions a stage needs, not at every position.

A response is ~10% of a row's tokens in the embedded default, and the head of a small model is a
large share of its forward (SmolLM2's 49152 x 576 projection: ~20% of the 135M teacher's FLOPs,
~45% of the 64M student's), followed by a softmax over the vocabulary at every projected position.

- `positions_logits`: logits at given positions [B, R] (the inference stages and evaluation).
- `dense_lm_head` patches `model.forward` (so DDP and DeepSpeed engines still run it) for two calls:
  TRL 1.16's SFT and DPO trainers' `fused_lm_head=True`, which TRL serves with a tiled fp32
  projection with its own autograd (2.3x slower per CPU step than the model's own forward), served
  here by one matmul over the labelled positions under the run's autocast, so the trainers, their
  losses and their metrics stay TRL's; and the distillation trainer's `logit_positions=[B, R]`.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch

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


def supports_dense_head(model) -> bool:
    config = model.config.get_text_config()
    return all(getattr(config, name, None) in (None, 1.0) for name in _LOGIT_TRANSFORMS)


def _gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [B, L, D] at positions [B, R] of the sequence axis -> [B, R, D]."""
    return values.gather(1, positions[..., None].expand(-1, -1, values.shape[-1]))


def positions_logits(model, positions: torch.Tensor, **inputs) -> tuple[torch.Tensor, ModelOutput]:
    """The logits [B, R, V] at `positions` [B, R] of the sequence axis, and the decoder's output (its
    `cache` where `use_cache`). The head projects those positions only; a head that transforms its
    logits (`supports_dense_head` False) runs the model's own forward and is gathered from."""
    if not supports_dense_head(model):
        output = model(**inputs)
        return _gather_positions(output.logits, positions), output
    output = getattr(model, model.base_model_prefix)(**inputs)
    return model.get_output_embeddings()(_gather_positions(output.last_hidden_state, positions)), output


def dense_lm_head(model) -> bool:
    """Patch `model.forward` so that `fused_lm_head=True` returns TRL's FusedCausalLMOutput from one
    dense projection of the positions whose label is not -100, and `logit_positions=[B, R]` returns
    the logits [B, R, V] at those positions (`positions_logits`). Returns False (nothing patched) for
    heads that transform their logits."""
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

    def forward(
        self,
        *args,
        fused_lm_head=False,
        logit_positions=None,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        if logit_positions is not None:
            kwargs.update(zip(("input_ids", "attention_mask"), args), use_cache=False)
            return CausalLMOutputWithPast(logits=positions_logits(self, logit_positions, **kwargs)[0])
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            kwargs.update({key: value for key, value in extra.items() if value is not None})
            return original_forward(self, *args, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput  # only TRL's trainers ask for it

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
