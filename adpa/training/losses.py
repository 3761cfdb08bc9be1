"""Losses for SFT, vanilla KD, DCKD and ADPA.

Convention: logits and labels are already aligned, i.e. ``logits[b, t]`` is the model's distribution for
``labels[b, t]`` (the caller does the causal shift). ``mask[b, t]`` is 1 on response tokens only.
Means are per token over the response, then over the batch (see ``response_mean``).
Teachers are stored sparsely (``TopKBatch``): per position the ids of the teacher's top-k set K_t plus a value
per id (log-probabilities for KD and DCKD, advantages for ADPA); no dense vocab-size teacher tensor is ever built.
The sequences of an example are named by what they are: ``chosen`` (y_w), ``rejected`` (y_l) and ``own``
(the student's own response).
Student log-probabilities are computed in float32 whatever the logits' dtype.

Every loss is a weighted sum of response means of per-token terms (NLL, top-k KL, expected advantage; the
tables of adpa/dag/objectives.py), so it can also be computed from chunks of positions: ``response_term_sums``
gives each term's per-row sums over the positions it is handed, sums over chunks add up, and
``loss_from_term_sums`` takes the means.
No [B, T, V] float32 tensor then needs to exist for more than one chunk (lm_head.sum_over_position_chunks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from adpa.dag.objectives import Terms, resolve


class TopKBatch(NamedTuple):
    """A teacher's stored top-k values at the label positions of a batch.

    ids [B,T,k] token ids K_t (int64); values [B,T,k] teacher log pi(a|s_t) (KD, DCKD) or advantages A(s_t, a)
    (ADPA); rest [B,T] log(1 - sum_K pi) (-inf when K_t holds all mass), None where the store has no rest bin.
    """

    ids: Tensor
    values: Tensor
    rest: Tensor | None = None


def response_sums(values: Tensor, mask: Tensor) -> Tensor:
    """values [B,T], mask [B,T] -> [B]: each row's sum over its response tokens.

    Sums over chunks of the T axis add up to the sum over all of it: the chunked losses accumulate these.
    """
    # where, not multiply: masked positions may hold inf/NaN (e.g. padding) and 0 * inf = NaN
    return torch.where(mask.bool(), values, 0).sum(-1)


def mean_of_response_sums(sums: Tensor, mask: Tensor) -> Tensor:
    """sums [B] (``response_sums`` over all of a row's positions), mask [B,T] -> scalar: each row's sum over its
    count of response tokens, then the batch mean; a row without response tokens contributes 0 (and counts)."""
    return (sums / mask.bool().sum(-1).clamp(min=1)).mean()


def response_mean(values: Tensor, mask: Tensor) -> Tensor:
    """values [B,T], mask [B,T] -> scalar: mean over each row's response tokens, then over the batch.

    A row without response tokens contributes 0 (and still counts in the batch mean).
    """
    return mean_of_response_sums(response_sums(values, mask), mask)


def _logz(logits: Tensor) -> Tensor:
    """[B,T,V] -> [B,T,1] float32 log-partition."""
    return torch.logsumexp(logits.float(), dim=-1, keepdim=True)


def _gather_logprobs(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """logits [B,T,V], ids [B,T,k], mask [B,T] -> student log pi(ids) [B,T,k] in float32."""
    # ids at masked positions may be -100 or garbage: point them at id 0 so gather stays in range
    ids = torch.where(mask.bool().unsqueeze(-1), ids, 0)
    return logits.gather(-1, ids).float() - _logz(logits)


def token_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """[B,T,V],[B,T],[B,T] -> [B,T] float32 log pi(label); 0 at masked positions."""
    logp = _gather_logprobs(logits, labels.unsqueeze(-1), mask).squeeze(-1)
    return torch.where(mask.bool(), logp, 0)


def nll_tokens(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """[B,T,V],[B,T],[B,T] -> [B,T] float32 per-token NLL -log pi(label); 0 at masked positions."""
    return -token_logprobs(logits, labels, mask)


def nll_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """[B,T,V],[B,T],[B,T] -> scalar: -response_mean(log pi(label))."""
    return -response_mean(token_logprobs(logits, labels, mask), mask)


def _plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """Elementwise p (log p - log q), defined as 0 where p == 0 (log p = -inf): no NaN in value or gradient."""
    p = logp.exp()
    safe_logp = torch.where(p > 0, logp, 0)
    return torch.where(p > 0, p * (safe_logp - logq), 0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012); each branch sees only safe inputs."""
    # float32 cannot resolve a remaining mass below ~1e-7 from the top-k sum; keep it finite there.
    x = x.clamp(max=-1e-7)
    near_zero = x > -0.6931471805599453
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x))),
    )


def _topk_kl(student_topk: Tensor, topk_logprobs: Tensor, rest_logmass: Tensor) -> Tensor:
    """Per-token KL on k+1 bins from the student's log-probs at the teacher's top-k ids: [B,T,k] -> [B,T]."""
    # The student's remaining mass from its k gathered log-probs: no second pass over the vocabulary.
    student_rest = _log1mexp(torch.logsumexp(student_topk, dim=-1))
    return _plogp_ratio(topk_logprobs.float(), student_topk).sum(-1) + _plogp_ratio(rest_logmass.float(), student_rest)


def topk_kl_from_logprobs(student_topk: Tensor, topk: TopKBatch, mask: Tensor) -> Tensor:
    """topk_forward_kl given the student's log-probs already gathered at ``topk.ids`` [B,T,k] -> scalar."""
    return response_mean(_topk_kl(student_topk.float(), topk.values, topk.rest), mask.bool())


def topk_kl_tokens(logits: Tensor, topk: TopKBatch, mask: Tensor) -> Tensor:
    """Per-token ``topk_forward_kl`` terms: logits [B,T,V], topk [B,T,k], mask [B,T] -> [B,T] float32 (garbage
    at masked positions: reduce with ``response_sums``)."""
    return _topk_kl(_gather_logprobs(logits, topk.ids, mask), topk.values, topk.rest)


def topk_forward_kl(logits: Tensor, topk: TopKBatch, mask: Tensor) -> Tensor:
    """Forward KL(teacher || student) on k+1 bins: the teacher's top-k ids plus one "rest" bin.

    logits [B,T,V] student; topk: the teacher's ids K_t [B,T,k], log-probs log pi_T(a|s_t) [B,T,k] and rest
    [B,T] (see ``TopKBatch``); mask [B,T]. Returns scalar response_mean(KL_t). One pass over the vocabulary
    (the log-normalizer).
    """
    return topk_kl_from_logprobs(_gather_logprobs(logits, topk.ids, mask), topk, mask)


def advantage_tokens(logits: Tensor, advantage: TopKBatch, mask: Tensor) -> Tensor:
    """Per-token ``adpa_advantage_term`` terms sum_{a in K_t} pi_S(a|s_t) A(s_t, a): [B,T,V], [B,T,k], [B,T]
    -> [B,T] float32."""
    mask = mask.bool()
    probs = _gather_logprobs(logits, advantage.ids, mask).exp()
    # zero padding advantages so a NaN/inf there cannot leak into the gradient via 0 * NaN
    values = torch.where(mask.unsqueeze(-1), advantage.values.detach().float(), 0)
    return (probs * values).sum(-1)


def adpa_advantage_term(logits: Tensor, advantage: TopKBatch, mask: Tensor) -> Tensor:
    """Expected advantage of the student's policy over the DPO teacher's top-k set.

    logits [B,T,V] student; advantage: ids [B,T,k] and values [B,T,k] = log pi_dpo(a|s_t) - log pi_ref(a|s_t)
    (signed, never clamped; treated as a constant; rest unused); mask [B,T].
    Returns scalar response_mean(sum_{a in K_t} pi_S(a|s_t) A(s_t, a)).
    """
    return response_mean(advantage_tokens(logits, advantage, mask), mask)


def nll_and_topk_kl_tokens(logits: Tensor, labels: Tensor, mask: Tensor, topk: TopKBatch) -> tuple[Tensor, Tensor]:
    """Per-token (NLL, top-k KL) of one response from one gather and one log-normalizer -> two [B,T] float32
    (the KL holds garbage at masked positions: reduce with ``response_sums``)."""
    student = _gather_logprobs(logits, torch.cat([labels.unsqueeze(-1), topk.ids], dim=-1), mask)
    return -torch.where(mask.bool(), student[..., 0], 0), _topk_kl(student[..., 1:], topk.values, topk.rest)


def _nll_and_topk_kl(logits: Tensor, labels: Tensor, mask: Tensor, topk: TopKBatch) -> tuple[Tensor, Tensor]:
    """(NLL, topk_forward_kl) of one response from one gather and one log-normalizer -> two scalars."""
    nll, kl = nll_and_topk_kl_tokens(logits, labels, mask, topk)
    return response_mean(nll, mask), response_mean(kl, mask)


def vanilla_kd_loss(
    *,
    chosen_logits: Tensor,
    chosen_labels: Tensor,
    chosen_mask: Tensor,
    chosen_topk: TopKBatch,
    nll_weight: float,
    kl_weight: float,
) -> Tensor:
    """Vanilla KD: nll_weight * NLL(y_w) + kl_weight * KL(y_w) -> scalar; the chosen response only.

    chosen_logits [B,T,V], chosen_labels [B,T], chosen_mask [B,T]; the KL is ``topk_forward_kl`` against the
    teacher's stored top-k on y_w (``chosen_topk``).
    """
    nll, kl = _nll_and_topk_kl(chosen_logits, chosen_labels, chosen_mask, chosen_topk)
    return nll_weight * nll + kl_weight * kl


def dckd_loss(
    *,
    chosen_logits: Tensor,
    chosen_labels: Tensor,
    chosen_mask: Tensor,
    chosen_topk: TopKBatch,
    rejected_logits: Tensor,
    rejected_mask: Tensor,
    rejected_topk: TopKBatch,
    nll_weight: float,
    chosen_kl_weight: float,
    rejected_kl_weight: float,
) -> Tensor:
    """DCKD: nll_weight * NLL(y_w) + chosen_kl_weight * KL(y_w) + rejected_kl_weight * KL(y_l) -> scalar.

    chosen_* as in ``vanilla_kd_loss``; rejected_logits [B,T',V], rejected_mask [B,T']. Each KL is
    ``topk_forward_kl`` against the teacher's stored top-k on that response.
    """
    nll, kl_chosen = _nll_and_topk_kl(chosen_logits, chosen_labels, chosen_mask, chosen_topk)
    kl_rejected = topk_forward_kl(rejected_logits, rejected_topk, rejected_mask)
    return nll_weight * nll + chosen_kl_weight * kl_chosen + rejected_kl_weight * kl_rejected


def adpa_loss(
    *,
    chosen_logits: Tensor,
    chosen_labels: Tensor,
    chosen_mask: Tensor,
    own_logits: Tensor,
    own_mask: Tensor,
    own_advantage: TopKBatch,
    adpa_weight: float,
    nll_weight: float,
) -> Tensor:
    """ADPA: nll_weight * NLL(y_w) minus adpa_weight (lambda) * expected advantage on the student's own response.

    chosen_* as in ``vanilla_kd_loss``; own_logits [B,T',V] the student on its own sampled response, own_mask
    [B,T']; own_advantage: the DPO teacher's top-k ids and advantages [B,T',k] on that response. -> scalar.
    """
    nll = nll_loss(chosen_logits, chosen_labels, chosen_mask)
    return nll_weight * nll - adpa_weight * adpa_advantage_term(own_logits, own_advantage, own_mask)


class Response(NamedTuple):
    """What a loss reads of one named sequence besides the student's logits, in the [B,T] layout: labels [B,T],
    mask [B,T] and the stored top-k (``TopKBatch``; unread where the sequence's terms do not use it)."""

    labels: Tensor
    mask: Tensor
    topk: TopKBatch

    def at(self, positions: slice) -> Response:
        """The same response at ``positions`` of the T axis only (a chunk of positions)."""
        topk = TopKBatch(*(None if part is None else part[:, positions] for part in self.topk))
        return Response(self.labels[:, positions], self.mask[:, positions], topk)


def sequence_token_terms(logits: Tensor, response: Response, kinds: set[str] | frozenset[str]) -> dict[str, Tensor]:
    """The per-token values of the token `kinds` (adpa/dag/objectives.py: "nll", "topk_kl", "advantage") on one
    sequence, from one gather of the student's log-probs (at the label and at the stored top-k ids) and one
    log-normalizer: logits [B,T,V] -> kind -> [B,T] float32 (garbage at masked positions: reduce with
    ``response_sums``)."""
    unknown = set(kinds) - {"nll", "topk_kl", "advantage"}
    if unknown:
        raise ValueError(f"unknown token term {sorted(unknown)[0]!r} (nll, topk_kl or advantage)")
    wants_label, wants_topk = "nll" in kinds, bool({"topk_kl", "advantage"} & set(kinds))
    ids = [response.labels.unsqueeze(-1)] if wants_label else []
    if wants_topk:
        ids.append(response.topk.ids)
    student = _gather_logprobs(logits, torch.cat(ids, dim=-1) if len(ids) > 1 else ids[0], response.mask)
    tokens = {}
    if wants_label:
        tokens["nll"] = -torch.where(response.mask.bool(), student[..., 0], 0)
        student = student[..., 1:]
    if "topk_kl" in kinds:
        tokens["topk_kl"] = _topk_kl(student, response.topk.values, response.topk.rest)
    if "advantage" in kinds:
        # zero padding advantages so a NaN/inf there cannot leak into the gradient via 0 * NaN
        values = torch.where(response.mask.bool().unsqueeze(-1), response.topk.values.detach().float(), 0)
        tokens["advantage"] = (student.exp() * values).sum(-1)
    return tokens


def response_term_sums(
    objective: str | Terms, logits: Mapping[str, Tensor], responses: Mapping[str, Response]
) -> dict[str, Tensor]:
    """Each of the loss's terms (adpa/dag/objectives.py: a table of them, or the name of one of its LOSSES)
    summed per row over the response tokens of the positions given: logits[name] [B,T,V] and
    responses[name] ([B,T]) per sequence name -> term name -> [B] float32.

    Called on all positions, or chunk by chunk with the chunks' sums added: ``loss_from_term_sums`` then gives
    the loss (for the paper's: nll_loss, vanilla_kd_loss, dckd_loss or adpa_loss) either way.
    """
    terms = resolve(objective)
    by_sequence: dict[str, set[str]] = {}
    for term in terms.values():
        by_sequence.setdefault(term.sequence, set()).add(term.tokens)
    tokens = {name: sequence_token_terms(logits[name], responses[name], kinds) for name, kinds in by_sequence.items()}
    return {
        name: response_sums(tokens[term.sequence][term.tokens], responses[term.sequence].mask)
        for name, term in terms.items()
    }


def loss_from_term_sums(
    objective: str | Terms, sums: Mapping[str, Tensor], masks: Mapping[str, Tensor], weights: Mapping[str, float]
) -> Tensor:
    """The loss from its terms' per-row sums over all positions (``response_term_sums``, added over chunks),
    the sequences' whole masks [B,T] (for the per-row token counts) and the loss's weight settings."""
    weighted = []
    for name, term in resolve(objective).items():
        weight = term.sign * (1.0 if term.weight is None else weights[term.weight])
        weighted.append(weight * mean_of_response_sums(sums[name], masks[term.sequence]))
    return sum(weighted[1:], weighted[0])


def clamp_advantage_like_reference(advantage: Tensor) -> Tensor:
    """Clamp advantages into [1e-8, 1 - 1e-8] exactly as the reference ADPA code does.

    Known defect, kept only to match the reference implementation's numbers (off by default): the reference's
    ``prob_stabilize`` clamps its target "probabilities", which for ADPA hold advantages, so every negative
    advantage becomes ~0 (1e-8) and every advantage above 1 becomes ~1: the student is never pushed away from
    tokens the DPO teacher disfavours.
    """
    return advantage.clamp(min=1e-8, max=1 - 1e-8)
