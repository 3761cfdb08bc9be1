"""adpa.training.losses against slow dense float64 references (Python loops over b, t, dense teacher built here)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from reference_losses import dpo_loss, sequence_logprobs

from adpa.training import losses
from adpa.training.losses import TopKBatch

B, T, V, K = 3, 7, 50, 5
FULL_MASS = (0, 3)  # (b, t) where the teacher's top-k holds all its mass: rest_logmass = -inf


def make_mask(gen: torch.Generator, rows: int, length: int) -> torch.Tensor:
    """Random prompt / response / padding layout; row 1 is fully masked (no response tokens)."""
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for b in range(rows):
        if b == 1:
            continue
        prompt = int(torch.randint(0, 3, (), generator=gen))
        response = int(torch.randint(2, length - prompt, (), generator=gen))
        mask[b, prompt : prompt + response] = True
    mask[FULL_MASS] = True
    return mask


def make_batch(seed: int = 0, length: int = T) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, length, V, generator=gen)
    mask = make_mask(gen, B, length)
    labels = torch.randint(0, V, (B, length), generator=gen)
    # masked labels are -100 or far out of the vocab: neither may be indexed
    labels = torch.where(mask, labels, torch.where(torch.rand(B, length, generator=gen) < 0.5, -100, 10**6))
    topk_ids = torch.rand(B, length, V, generator=gen).argsort(-1)[..., :K]  # distinct ids per position
    teacher_logits = 3 * torch.randn(B, length, V, generator=gen, dtype=torch.float64)
    outside = torch.ones(V, dtype=torch.bool)
    outside[topk_ids[FULL_MASS]] = False
    teacher_logits[FULL_MASS][outside] = -torch.inf
    teacher_logp = teacher_logits.log_softmax(-1)  # dense [B,T,V]: the test's ground truth
    in_topk = torch.zeros(B, length, V, dtype=torch.bool).scatter(-1, topk_ids, True)
    topk_logprobs = teacher_logp.gather(-1, topk_ids).float()
    rest_logmass = teacher_logp.masked_fill(in_topk, -torch.inf).logsumexp(-1).float()
    advantage = torch.randn(B, length, K, generator=gen)
    return SimpleNamespace(
        logits=logits,
        mask=mask,
        labels=labels,
        topk_ids=topk_ids,
        teacher_logp=teacher_logp,
        topk_logprobs=topk_logprobs,
        rest_logmass=rest_logmass,
        advantage=advantage,
        topk=TopKBatch(topk_ids, topk_logprobs, rest_logmass),
        advantage_topk=TopKBatch(topk_ids, advantage),
    )


def dense_mean(per_token, mask: torch.Tensor) -> torch.Tensor:
    """Per-token mean over each row's response, then batch mean, by explicit loops."""
    rows = []
    for b in range(mask.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(mask.shape[1]):
            if mask[b, t]:
                total = total + per_token(b, t)
        rows.append(total / max(1, int(mask[b].sum())))
    return torch.stack(rows).mean()


def dense_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dense_mean(lambda b, t: -logits[b, t].log_softmax(-1)[labels[b, t]], mask)


def dense_kl(logits: torch.Tensor, batch: SimpleNamespace) -> torch.Tensor:
    def kl(b: int, t: int) -> torch.Tensor:
        student, teacher = logits[b, t].softmax(-1), batch.teacher_logp[b, t].exp()
        ids = batch.topk_ids[b, t]
        outside = torch.ones(V, dtype=torch.bool)
        outside[ids] = False
        p = torch.cat([teacher[ids], teacher[outside].sum()[None]])
        q = torch.cat([student[ids], student[outside].sum()[None]])
        return sum(p[i] * (p[i].log() - q[i].log()) for i in range(K + 1) if p[i] > 0)

    return dense_mean(kl, batch.mask)


def dense_advantage_term(logits: torch.Tensor, ids: torch.Tensor, advantage: torch.Tensor, mask) -> torch.Tensor:
    def term(b: int, t: int) -> torch.Tensor:
        probs = logits[b, t].softmax(-1)
        return sum(probs[ids[b, t, i]] * float(advantage[b, t, i]) for i in range(ids.shape[-1]))

    return dense_mean(term, mask)


def value_and_grad(fn, logits: torch.Tensor, dtype: torch.dtype = torch.float32):
    leaf = logits.detach().to(dtype).requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach().double(), grad.double()


def assert_matches_dense(fn, dense_fn, logits: torch.Tensor, atol: float = 1e-5) -> None:
    value, grad = value_and_grad(fn, logits)
    ref_value, ref_grad = value_and_grad(dense_fn, logits, torch.float64)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, ref_value, atol=atol, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=1e-4)


def test_response_mean():
    gen = torch.Generator().manual_seed(1)
    values, mask = torch.randn(B, T, generator=gen), make_mask(gen, B, T)
    values[~mask] = torch.nan  # padding garbage must not leak
    expected = dense_mean(lambda b, t: values[b, t].double(), mask)
    torch.testing.assert_close(losses.response_mean(values, mask).double(), expected)
    torch.testing.assert_close(losses.response_mean(values, mask.float()).double(), expected)


def test_sequence_logprobs_and_nll():
    batch = make_batch()

    def dense_seq(logits: torch.Tensor) -> torch.Tensor:
        rows = [
            sum(
                (logits[b, t].log_softmax(-1)[batch.labels[b, t]] for t in range(T) if batch.mask[b, t]),
                torch.zeros((), dtype=torch.float64),
            )
            for b in range(B)
        ]
        return torch.stack(rows)

    seq = sequence_logprobs(batch.logits, batch.labels, batch.mask)
    assert seq.shape == (B,) and seq[1] == 0
    torch.testing.assert_close(seq.double(), dense_seq(batch.logits.double()), atol=1e-5, rtol=1e-5)
    weights = torch.tensor([0.3, -1.2, 2.0])  # a non-uniform weighting also checks per-row gradients
    assert_matches_dense(
        lambda x: (sequence_logprobs(x, batch.labels, batch.mask) * weights).sum(),
        lambda x: (dense_seq(x) * weights.double()).sum(),
        batch.logits,
    )
    assert_matches_dense(
        lambda x: losses.nll_loss(x, batch.labels, batch.mask),
        lambda x: dense_nll(x, batch.labels, batch.mask),
        batch.logits,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_forward_kl_matches_dense(seed: int):
    batch = make_batch(seed)
    assert batch.rest_logmass[FULL_MASS] == -torch.inf and batch.mask[FULL_MASS]
    assert_matches_dense(
        lambda x: losses.topk_forward_kl(x, batch.topk, batch.mask),
        lambda x: dense_kl(x, batch),
        batch.logits,
    )


def test_topk_forward_kl_nonnegative_per_position_and_zero_at_teacher():
    batch = make_batch(2)
    for b, t in batch.mask.nonzero().tolist():
        only = torch.zeros_like(batch.mask)
        only[b, t] = True
        kl = losses.topk_forward_kl(batch.logits, batch.topk, only)
        assert kl >= 0
    # A student equal to the teacher on the k+1 bins but with a different shape inside the rest bin: KL = 0.
    in_topk = torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, batch.topk_ids, True)
    noise = torch.randn(B, T, V, dtype=torch.float64).masked_fill(in_topk, -torch.inf).log_softmax(-1)
    student = torch.where(in_topk, batch.teacher_logp, batch.rest_logmass.double().unsqueeze(-1) + noise)
    kl = losses.topk_forward_kl(student.float(), batch.topk, batch.mask)
    assert abs(float(kl)) < 1e-5
    assert float(kl) != float(losses.topk_forward_kl(batch.logits, batch.topk, batch.mask))


def test_adpa_advantage_term_matches_dense_and_is_signed():
    batch = make_batch()
    assert_matches_dense(
        lambda x: losses.adpa_advantage_term(x, batch.advantage_topk, batch.mask),
        lambda x: dense_advantage_term(x, batch.topk_ids, batch.advantage, batch.mask),
        batch.logits,
    )
    advantage = batch.advantage.clone().requires_grad_()
    logits = batch.logits.clone().requires_grad_()  # leaves: .grad tells whether gradient reached them
    losses.adpa_advantage_term(logits, TopKBatch(batch.topk_ids, advantage), batch.mask).backward()
    assert advantage.grad is None and logits.grad is not None
    negative = -batch.advantage.abs() - 0.1
    term = losses.adpa_advantage_term(batch.logits, TopKBatch(batch.topk_ids, negative), batch.mask)
    assert term < 0  # not clamped: the student is pushed away from disfavoured tokens
    torch.testing.assert_close(
        term.double(), dense_advantage_term(batch.logits.double(), batch.topk_ids, negative, batch.mask)
    )


def test_clamp_advantage_like_reference():
    advantage = torch.tensor([-3.0, -1e-3, 0.0, 0.25, 0.5, 2.0])
    clamped = losses.clamp_advantage_like_reference(advantage)
    assert torch.equal(clamped[:3], torch.full((3,), 1e-8))
    assert torch.equal(clamped[3:5], advantage[3:5])
    assert clamped[5] == torch.tensor(1 - 1e-8)
    batch = make_batch()
    clamped = TopKBatch(batch.topk_ids, losses.clamp_advantage_like_reference(-batch.advantage.abs()))
    clamped_term = losses.adpa_advantage_term(batch.logits, clamped, batch.mask)
    assert 0 < clamped_term < 1e-7


def test_adpa_loss():
    chosen, own = make_batch(3), make_batch(4, length=T + 2)  # y_w and the student's own response differ
    weight, nll_weight = 0.7, 0.5

    def fn(chosen_logits, own_logits):
        return losses.adpa_loss(
            chosen_logits=chosen_logits,
            chosen_labels=chosen.labels,
            chosen_mask=chosen.mask,
            own_logits=own_logits,
            own_mask=own.mask,
            own_advantage=own.advantage_topk,
            adpa_weight=weight,
            nll_weight=nll_weight,
        )

    def dense(chosen_logits, own_logits):
        return nll_weight * dense_nll(chosen_logits, chosen.labels, chosen.mask) - weight * dense_advantage_term(
            own_logits, own.topk_ids, own.advantage, own.mask
        )

    assert_matches_dense(lambda x: fn(x, own.logits), lambda x: dense(x, own.logits.double()), chosen.logits)
    assert_matches_dense(lambda x: fn(chosen.logits, x), lambda x: dense(chosen.logits.double(), x), own.logits)


def test_dckd_loss():
    chosen, rejected = make_batch(5), make_batch(6)
    weights = dict(nll_weight=0.5, chosen_kl_weight=0.2, rejected_kl_weight=0.3)

    def fn(chosen_logits, rejected_logits):
        return losses.dckd_loss(
            chosen_logits=chosen_logits,
            chosen_labels=chosen.labels,
            chosen_mask=chosen.mask,
            chosen_topk=chosen.topk,
            rejected_logits=rejected_logits,
            rejected_mask=rejected.mask,
            rejected_topk=rejected.topk,
            **weights,
        )

    def dense(chosen_logits, rejected_logits):
        return (
            0.5 * dense_nll(chosen_logits, chosen.labels, chosen.mask)
            + 0.2 * dense_kl(chosen_logits, chosen)
            + 0.3 * dense_kl(rejected_logits, rejected)
        )

    assert_matches_dense(lambda x: fn(x, rejected.logits), lambda x: dense(x, rejected.logits.double()), chosen.logits)
    assert_matches_dense(lambda x: fn(chosen.logits, x), lambda x: dense(chosen.logits.double(), x), rejected.logits)


def test_vanilla_kd_loss():
    chosen, rejected = make_batch(8), make_batch(9)
    nll_weight, kl_weight = 0.6, 0.4

    def fn(chosen_logits):
        return losses.vanilla_kd_loss(
            chosen_logits=chosen_logits,
            chosen_labels=chosen.labels,
            chosen_mask=chosen.mask,
            chosen_topk=chosen.topk,
            nll_weight=nll_weight,
            kl_weight=kl_weight,
        )

    assert_matches_dense(
        fn,
        lambda x: nll_weight * dense_nll(x, chosen.labels, chosen.mask) + kl_weight * dense_kl(x, chosen),
        chosen.logits,
    )
    value, grad = value_and_grad(fn, chosen.logits)
    separate = value_and_grad(
        lambda x: nll_weight * losses.nll_loss(x, chosen.labels, chosen.mask)
        + kl_weight * losses.topk_forward_kl(x, chosen.topk, chosen.mask),
        chosen.logits,
    )
    torch.testing.assert_close((value, grad), separate)
    # DCKD without its rejected term is vanilla KD on the chosen half, whatever the rejected half holds.
    dckd = value_and_grad(
        lambda x: losses.dckd_loss(
            chosen_logits=x,
            chosen_labels=chosen.labels,
            chosen_mask=chosen.mask,
            chosen_topk=chosen.topk,
            rejected_logits=rejected.logits,
            rejected_mask=rejected.mask,
            rejected_topk=rejected.topk,
            nll_weight=nll_weight,
            chosen_kl_weight=kl_weight,
            rejected_kl_weight=0.0,
        ),
        chosen.logits,
    )
    torch.testing.assert_close((value, grad), dckd)


def test_bf16_logits_close_to_fp32():
    batch = make_batch()
    fns = [
        lambda x: losses.nll_loss(x, batch.labels, batch.mask),
        lambda x: losses.topk_forward_kl(x, batch.topk, batch.mask),
        lambda x: losses.adpa_advantage_term(x, batch.advantage_topk, batch.mask),
    ]
    rounded = batch.logits.bfloat16().float()
    for fn in fns:
        value, grad = value_and_grad(fn, batch.logits, torch.bfloat16)
        assert fn(batch.logits.bfloat16()).dtype == torch.float32
        # float32 arithmetic on bf16 inputs: identical to upcasting first, close to the unrounded logits
        upcast_value, _ = value_and_grad(fn, rounded)
        torch.testing.assert_close(value, upcast_value, atol=1e-6, rtol=1e-6)
        fp32_value, fp32_grad = value_and_grad(fn, batch.logits)
        torch.testing.assert_close(value, fp32_value, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(grad, fp32_grad, atol=5e-3, rtol=5e-2)


def trl_sigmoid_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """TRL 1.16's own sigmoid DPO: DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py) on a stub trainer.

    TRL has no standalone dpo_loss; the loss is inline in _compute_loss, which takes per-token log-probs from the
    model's fused LM head and sums them. The stub model returns per-token log-probs whose row sums are the given
    sequence log-probs; precompute_ref_logps=True makes TRL read the reference log-probs from the inputs.
    Returns (loss, d loss / d policy logps [2B], logged mean chosen reward, logged mean rejected reward).
    """
    from trl import DPOTrainer

    n, length = policy_chosen.shape[0], 4
    policy = torch.cat([policy_chosen, policy_rejected]).detach().requires_grad_()
    per_token = torch.cat([policy[:, None] / 3, policy[:, None] / 3, policy[:, None] / 3], 1)
    model = SimpleNamespace(training=True)
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * n, length - 1),
        mean_logits=torch.zeros(2 * n, length - 1),
        is_top1=torch.zeros(2 * n, length - 1, dtype=torch.bool),
    )
    stub = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = dict(
        input_ids=torch.zeros(2 * n, length, dtype=torch.long),
        attention_mask=torch.ones(2 * n, length),
        completion_mask=torch.ones(2 * n, length, dtype=torch.long),
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )
    loss = DPOTrainer._compute_loss(stub, lambda **_: outputs, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy)
    metrics = stub._metrics["train"]
    return loss, grad, metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


def test_dpo_loss_matches_trl():
    gen = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (-40 * torch.rand(5, generator=gen, dtype=torch.float64) for _ in range(4))
    beta = 0.1
    trl_loss, trl_grad, trl_chosen_reward, trl_rejected_reward = trl_sigmoid_dpo(pc, pr, rc, rr, beta)
    policy = torch.cat([pc, pr]).requires_grad_()
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy[:5], policy[5:], rc, rr, beta)
    (grad,) = torch.autograd.grad(loss, policy)
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(grad, trl_grad)
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert chosen_rewards.mean().item() == pytest.approx(trl_chosen_reward)
    assert rejected_rewards.mean().item() == pytest.approx(trl_rejected_reward)
    expected = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(loss, expected)


# Chunked losses: the trainer's layout, each sequence's B rows one after the other ([S*B, T]), the head projecting
# hidden states [S*B, T, H] a chunk of positions at a time (lm_head.sum_over_position_chunks).
CHUNKED_SEQUENCES = {
    "nll": ("chosen",),
    "vanilla_kd": ("chosen",),
    "dckd": ("chosen", "rejected"),
    "adpa": ("chosen", "own"),
}
CHUNKED_WEIGHTS = {
    "nll": {},
    "vanilla_kd": {"nll_weight": 0.6, "kl_weight": 0.4},
    "dckd": {"nll_weight": 0.5, "chosen_kl_weight": 0.2, "rejected_kl_weight": 0.3},
    "adpa": {"nll_weight": 0.5, "adpa_weight": 0.7},
}
HIDDEN = 12


def chunked_case(objective: str) -> tuple[dict[str, losses.Response], torch.Tensor, torch.nn.Linear]:
    """The objective's responses (make_batch: row 1 of each without response tokens), hidden states
    [S*B, T, H] and a head H -> V."""
    responses = {}
    for index, name in enumerate(CHUNKED_SEQUENCES[objective]):
        batch = make_batch(10 + index)
        topk = batch.advantage_topk if name == "own" else batch.topk
        responses[name] = losses.Response(batch.labels, batch.mask, topk)
    gen = torch.Generator().manual_seed(20)
    hidden = torch.randn(len(responses) * B, T, HIDDEN, generator=gen)
    head = torch.nn.Linear(HIDDEN, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, HIDDEN, generator=gen) / 2)
        head.bias.copy_(torch.randn(V, generator=gen))
    return responses, hidden, head


def loss_over_all_positions(objective: str, logits: torch.Tensor, responses: dict, weights: dict) -> torch.Tensor:
    """The public loss function of the objective on the logits [S*B, T, V] of every position."""
    by_name = dict(zip(responses, logits.split(B)))
    chosen = responses["chosen"]
    if objective == "nll":
        return losses.nll_loss(by_name["chosen"], chosen.labels, chosen.mask)
    kwargs = {"chosen_logits": by_name["chosen"], "chosen_labels": chosen.labels, "chosen_mask": chosen.mask}
    if objective == "vanilla_kd":
        return losses.vanilla_kd_loss(**kwargs, chosen_topk=chosen.topk, **weights)
    if objective == "dckd":
        rejected = responses["rejected"]
        return losses.dckd_loss(
            **kwargs,
            chosen_topk=chosen.topk,
            rejected_logits=by_name["rejected"],
            rejected_mask=rejected.mask,
            rejected_topk=rejected.topk,
            **weights,
        )
    own = responses["own"]
    return losses.adpa_loss(**kwargs, own_logits=by_name["own"], own_mask=own.mask, own_advantage=own.topk, **weights)


def chunked_loss(objective: str, hidden, head, responses: dict, weights: dict, chunk: int) -> torch.Tensor:
    """The objective's loss from the head projecting `chunk` positions of hidden [S*B, T, H] at a time."""
    from adpa.modeling.lm_head import sum_over_position_chunks

    def chunk_sums(logits: torch.Tensor, positions: slice) -> dict[str, torch.Tensor]:
        by_name = dict(zip(responses, logits.split(B)))
        chunk_responses = {name: response.at(positions) for name, response in responses.items()}
        return losses.response_term_sums(objective, by_name, chunk_responses)

    sums = sum_over_position_chunks(hidden, head, chunk_sums, chunk)
    masks = {name: response.mask for name, response in responses.items()}
    return losses.loss_from_term_sums(objective, sums, masks, weights)


def loss_and_gradients(fn, hidden: torch.Tensor, head: torch.nn.Linear) -> list[torch.Tensor]:
    """fn(hidden, head) and its gradients with respect to hidden and the head's parameters."""
    leaf = hidden.detach().clone().requires_grad_()
    head.zero_grad()
    value = fn(leaf, head)
    value.backward()
    return [value.detach(), leaf.grad, head.weight.grad.clone(), head.bias.grad.clone()]


@pytest.mark.parametrize("chunk", [3, T, 100], ids=["chunks-of-3-of-7", "one-chunk", "chunk-above-length"])
@pytest.mark.parametrize("objective", ["nll", "vanilla_kd", "dckd", "adpa"])
def test_chunked_loss_and_gradients_equal_the_loss_over_all_positions(objective: str, chunk: int):
    """Per-row sums over chunks of positions (3 does not divide T = 7), then the means: the same loss and
    gradients as the public loss function on all positions' logits, rows without response tokens included."""
    responses, hidden, head = chunked_case(objective)
    assert all(not response.mask[1].any() for response in responses.values()), "a row without response tokens"
    weights = CHUNKED_WEIGHTS[objective]
    expected = loss_and_gradients(
        lambda x, projection: loss_over_all_positions(objective, projection(x), responses, weights), hidden, head
    )
    got = loss_and_gradients(
        lambda x, projection: chunked_loss(objective, x, projection, responses, weights, chunk), hidden, head
    )
    assert torch.isfinite(got[0]) and got[0] != 0
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_loss_under_bf16_autocast_matches_the_loss_over_all_positions():
    """Under autocast the head gives bf16 logits, the losses float32 log-probabilities; the recomputation in
    the backward runs under the same autocast as the forward."""
    responses, hidden, head = chunked_case("dckd")
    weights = CHUNKED_WEIGHTS["dckd"]

    def under_autocast(fn):
        def run(x, projection):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x, projection)

        return run

    expected = loss_and_gradients(
        under_autocast(lambda x, projection: loss_over_all_positions("dckd", projection(x), responses, weights)),
        hidden,
        head,
    )
    got = loss_and_gradients(
        under_autocast(lambda x, projection: chunked_loss("dckd", x, projection, responses, weights, 3)), hidden, head
    )
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "hidden"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # The head's gradient is one bf16 matmul per chunk, each rounded to bf16 before they add: bf16 resolution.
    for name, a, b in zip(("weight", "bias"), got[2:], expected[2:]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2, msg=name)


def saved_logit_elements(fn) -> int:
    """Elements of the [*, *, V] float tensors (logits and what the losses derive from them) that autograd
    saves for the backward while fn runs."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point() and tensor.dim() == 3 and tensor.shape[-1] == V:
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved)


def test_chunked_loss_keeps_no_chunks_logits_for_the_backward(monkeypatch):
    """Each chunk runs under activation checkpointing: the forward keeps no logits for the backward (it
    recomputes them there, one chunk at a time), where projecting all positions keeps at least all of them.
    A single chunk runs without checkpointing: the same compute as projecting all positions at once."""
    from adpa.modeling import lm_head

    responses, hidden, head = chunked_case("dckd")
    weights, rows, chunk = CHUNKED_WEIGHTS["dckd"], hidden.shape[0], 3
    hidden.requires_grad_()

    def run(size: int) -> int:
        return saved_logit_elements(lambda: chunked_loss("dckd", hidden, head, responses, weights, size))

    assert run(chunk) <= rows * chunk * V
    with monkeypatch.context() as patched:  # the control: the same chunks without checkpointing
        patched.setattr(lm_head, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
        assert run(chunk) >= rows * T * V
    with monkeypatch.context() as patched:

        def refuse(*args, **kwargs):
            raise AssertionError("one chunk is not checkpointed")

        patched.setattr(lm_head, "checkpoint", refuse)
        assert run(T) >= rows * T * V
