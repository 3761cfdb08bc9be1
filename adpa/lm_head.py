"""One dense LM-head projection in place of TRL's tiled one.

TRL 1.16's SFT and DPO trainers call the model with `fused_lm_head=True` (`add_fused_lm_head`): a
tiled projection with its own autograd that runs the head in fp32 tiles and again in backward.
On CPU that made a training step 2.3x slower than the model's own forward (bench/train_throughput.py).
This forward serves the same call with one matmul over the labelled positions only (under the
run's autocast), so the trainers, their losses and their metrics stay TRL's.
"""

from __future__ import annotations

import types

import torch

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


def dense_lm_head(model) -> bool:
    """Patch `model.forward` so `fused_lm_head=True` returns TRL's FusedCausalLMOutput from one dense
    projection of the positions whose label is not -100. Returns False (nothing patched) for heads
    that transform their logits."""
    from transformers import PreTrainedModel
    from trl.trainer.utils import FusedCausalLMOutput

    # Under DeepSpeed the DPO reference arrives wrapped in its engine, which calls the module's forward.
    while not isinstance(model, PreTrainedModel) and hasattr(model, "module"):
        model = model.module
    if not supports_dense_head(model):
        return False
    original_forward = type(model).forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            kwargs.update({key: value for key, value in extra.items() if value is not None})
            return original_forward(self, *args, **kwargs)
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
