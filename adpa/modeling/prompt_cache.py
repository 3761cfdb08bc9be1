"""Prompts run once, responses continued from their cache: chosen and rejected share a prompt, and the
prompt is ~90% of a row's tokens in the embedded default (teacher_topk, evaluate)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adpa.modeling.lm_head import positions_logits
from adpa.modeling.sequences import pad_left, pad_right


@dataclass
class Prompts:
    """A batch of prompts run once: left-padded ids (every row ends at the last column) with their mask
    and positions, the decoder's cache, and the logits at the last prompt position [B, V] (which
    predict response token 0)."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: Any
    last_logits: torch.Tensor


def encode_prompts(model, prompts: Sequence[Sequence[int]], pad_id: int) -> Prompts:
    device = next(model.parameters()).device
    ids, mask = (tensor.to(device) for tensor in pad_left(prompts, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, output = positions_logits(
        model,
        torch.full((len(prompts), 1), ids.shape[1] - 1, device=device),
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
    )
    return Prompts(ids, mask, positions, output.cache, logits[:, 0])


def continuation_logits(
    model, prompts: Prompts, responses: Sequence[Sequence[int]], pad_id: int, keep_cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [B, R, V] that predict each response token (R: the longest response) and the mask
    [B, R], continuing the prompts' cache (a copy when `keep_cache`: the cache serves another call)."""
    device = prompts.mask.device
    ids, mask = (tensor.to(device) for tensor in pad_right(responses, pad_id))
    first = prompts.last_logits[:, None]
    if ids.shape[1] == 1:  # response token 0 only: the prompt's logits predict it
        return first, mask.bool()
    # Response token j + 1 is predicted by the logits at response position j; the last token predicts nothing.
    steps = torch.arange(ids.shape[1] - 1, device=device)[None, :].expand(len(responses), -1)
    logits, _ = positions_logits(
        model,
        steps,
        input_ids=ids,
        attention_mask=torch.cat([prompts.mask, mask], -1),
        position_ids=prompts.positions[:, -1:] + 1 + torch.arange(ids.shape[1], device=device)[None, :],
        cache=copy.deepcopy(prompts.cache) if keep_cache else prompts.cache,
        use_cache=True,
    )
    return torch.cat([first, logits], 1), mask.bool()
