"""Losses the package does not use (its DPO stages run TRL's DPOTrainer): references for the tests."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from adpa.training.losses import token_logprobs


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """[B,T,V],[B,T],[B,T] -> [B]: sum of log pi(label) over response tokens."""
    return token_logprobs(logits, labels, mask).sum(-1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO on summed sequence log-probs [B] each -> (mean loss, chosen_rewards [B], rejected_rewards [B])."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
