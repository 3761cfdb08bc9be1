"""The control chosen_sft and the ablation adpa_no_ref against dense references, on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adpa.distill import DistillationCollator, _distillation_trainer_class
from adpa.inference import write_advantage
from adpa.sequences import Exchange
from adpa.topk_store import TopKStore

V, PAD = 64, 0


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


EXCHANGES = [Exchange([5, 6, 7, 8, 9, 10], 3), Exchange([11, 12, 13, 14], 2), Exchange([15, 16, 17, 18, 19], 4)]


def dense_response_logprobs(model, exchange: Exchange) -> torch.Tensor:
    """log pi(. | s_t) at the response positions of one unpadded exchange, float64: [T, V]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([exchange.input_ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[exchange.response_start - 1 : len(exchange.input_ids) - 1]


def test_chosen_sft_loss_is_the_dense_nll_of_the_chosen_responses(tmp_path):
    from transformers import TrainingArguments

    features = [
        {"row": row, "chosen_ids": exchange.input_ids, "chosen_start": exchange.response_start}
        for row, exchange in enumerate(EXCHANGES)
    ]
    batch = DistillationCollator(PAD, {"chosen": None})(features)
    assert batch["topk_ids"].shape[-1] == 1 and not batch["topk_values"].any(), "no store: zero placeholders"
    model = tiny_model(0)
    trainer = _distillation_trainer_class()(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
        objective="nll",
        weights={},
    )
    loss = trainer.compute_loss(model, batch)
    per_row = []
    for exchange in EXCHANGES:
        logprobs = dense_response_logprobs(model, exchange)
        labels = torch.tensor(exchange.input_ids[exchange.response_start :])
        per_row.append(-logprobs.gather(-1, labels[:, None]).mean())
    assert loss.item() == pytest.approx(torch.stack(per_row).mean().item(), abs=1e-5)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("with_reference", [True, False], ids=["adpa", "adpa_no_ref"])
def test_advantage_store_matches_dense_log_probabilities(tmp_path, with_reference):
    dpo, ref = tiny_model(1), tiny_model(2)
    k = 4
    write_advantage(dpo, ref if with_reference else None, EXCHANGES, PAD, k, tmp_path / "store", 2, {})
    store = TopKStore(tmp_path / "store")
    assert len(store) == len(EXCHANGES) and store.k == k
    for row, exchange in enumerate(EXCHANGES):
        start, end = store.row_span(row)
        ids = torch.from_numpy(store.ids[start:end].astype(np.int64))
        values = torch.from_numpy(store.values[start:end].astype(np.float64))
        dpo_logprobs = dense_response_logprobs(dpo, exchange)
        # The DPO teacher's top-k ids, in its order.
        assert torch.equal(ids, dpo_logprobs.topk(k, -1).indices)
        expected = dpo_logprobs.gather(-1, ids)
        if with_reference:
            expected = expected - dense_response_logprobs(ref, exchange).gather(-1, ids)
        assert torch.allclose(values, expected, atol=2e-3), "fp16 storage"
    if not with_reference:
        assert (store.values <= 0).all(), "log-probabilities: never positive"


def test_padding_does_not_change_the_store(tmp_path):
    """Rows padded into one batch give the same store as each row alone."""
    dpo = tiny_model(1)
    write_advantage(dpo, None, EXCHANGES, PAD, 4, tmp_path / "alone", 1, {})
    write_advantage(dpo, None, EXCHANGES, PAD, 4, tmp_path / "batched", 3, {})
    alone, batched = TopKStore(tmp_path / "alone"), TopKStore(tmp_path / "batched")
    assert (alone.ids == batched.ids).all()
    assert np.allclose(alone.values.astype(np.float32), batched.values.astype(np.float32), atol=2e-3)


def full_logit_losses(model, batch, objective: str, weights: dict) -> torch.Tensor:
    """The loss from the logits of every position, cut to each response (the layout before the head
    projected response positions only)."""
    from adpa.distill import SEQUENCES
    from adpa.losses import TopKBatch, adpa_loss, dckd_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    parts = []
    size = logits.shape[0] // len(SEQUENCES[objective])
    for index in range(len(SEQUENCES[objective])):
        rows = slice(index * size, (index + 1) * size)
        picked = torch.stack([logits[row, batch["logit_positions"][row]] for row in range(rows.start, rows.stop)])
        topk = TopKBatch(batch["topk_ids"][rows], batch["topk_values"][rows], batch["topk_rest"][rows])
        parts.append((picked, batch["labels"][rows], batch["response_mask"][rows], topk))
    (c_logits, c_labels, c_mask, c_topk), (o_logits, _, o_mask, o_topk) = parts
    if objective == "dckd":
        return dckd_loss(
            chosen_logits=c_logits,
            chosen_labels=c_labels,
            chosen_mask=c_mask,
            chosen_topk=c_topk,
            rejected_logits=o_logits,
            rejected_mask=o_mask,
            rejected_topk=o_topk,
            **weights,
        )
    return adpa_loss(
        chosen_logits=c_logits,
        chosen_labels=c_labels,
        chosen_mask=c_mask,
        own_logits=o_logits,
        own_mask=o_mask,
        own_advantage=o_topk,
        **weights,
    )


@pytest.mark.parametrize("softcapped", [False, True], ids=["response-positions-head", "full-logits-fallback"])
@pytest.mark.parametrize("objective", ["dckd", "adpa"])
def test_loss_and_gradients_equal_the_full_logit_computation(tmp_path, objective, softcapped):
    """The head projects only the response positions (or, for a head that transforms its logits, the
    full logits are gathered): same loss and gradients as from the logits of every position."""
    from transformers import TrainingArguments

    k = 4
    write_advantage(tiny_model(1), tiny_model(2), EXCHANGES, PAD, k, tmp_path / "store", 3, {})
    store = TopKStore(tmp_path / "store")
    second = "rejected" if objective == "dckd" else "own"
    # The second sequence repeats the first's rows, so both line up with the store.
    features = [
        {
            "row": row,
            "chosen_ids": exchange.input_ids,
            "chosen_start": exchange.response_start,
            f"{second}_ids": exchange.input_ids,
            f"{second}_start": exchange.response_start,
        }
        for row, exchange in enumerate(EXCHANGES)
    ]
    batch = DistillationCollator(PAD, {"chosen": store if objective == "dckd" else None, second: store})(features)
    assert batch["logit_positions"].shape == batch["labels"].shape == (6, 3), "[S*B, longest response]"
    weights = (
        {"nll_weight": 1.0, "chosen_kl_weight": 0.5, "rejected_kl_weight": 0.2}
        if objective == "dckd"
        else {"nll_weight": 1.0, "adpa_weight": 0.7}
    )
    model, reference = tiny_model(0), tiny_model(0)
    if softcapped:
        model.config.final_logit_softcapping = reference.config.final_logit_softcapping = 50.0
    trainer = _distillation_trainer_class()(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[]),
        objective=objective,
        weights=weights,
    )
    assert trainer.head_takes_positions is not softcapped
    loss = trainer.compute_loss(model, batch)
    expected = full_logit_losses(reference, batch, objective, weights)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    expected.backward()
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(got.grad, want.grad, atol=1e-6), name


# The same prompts as EXCHANGES with other responses, one of a single token.
REJECTED = [Exchange([5, 6, 7, 20], 3), Exchange([11, 12, 21, 22, 23, 24], 2), Exchange([15, 16, 17, 18, 25, 26], 4)]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_teacher_topk_of_responses_sharing_their_prompts_matches_dense_log_probabilities(tmp_path, batch_size):
    """Each prompt runs once and both response sets continue from its cache: the stores equal the
    top-k of each whole row run alone."""
    from adpa.inference import write_teacher_topk

    teacher, k = tiny_model(3), 5
    write_teacher_topk(teacher, {"chosen": EXCHANGES, "rejected": REJECTED}, PAD, k, tmp_path, batch_size, {})
    for name, exchanges in (("chosen", EXCHANGES), ("rejected", REJECTED)):
        store = TopKStore(tmp_path / name)
        assert store.rest is not None and len(store) == len(exchanges)
        for row, exchange in enumerate(exchanges):
            start, end = store.row_span(row)
            logprobs = dense_response_logprobs(teacher, exchange)
            top = logprobs.topk(k, -1)
            assert torch.equal(torch.from_numpy(store.ids[start:end].astype(np.int64)), top.indices), (name, row)
            assert np.allclose(store.values[start:end].astype(np.float64), top.values.numpy(), atol=2e-3)
            rest = torch.log1p(-top.values.exp().sum(-1))
            assert np.allclose(store.rest[start:end].astype(np.float64), rest.numpy(), atol=2e-3)


def test_response_sets_with_different_prompts_are_refused(tmp_path):
    from adpa.errors import InputError
    from adpa.inference import write_teacher_topk

    other = [EXCHANGES[0], Exchange([11, 99, 13, 14], 2), EXCHANGES[2]]
    with pytest.raises(InputError, match="chosen and rejected row 1: different prompts"):
        write_teacher_topk(tiny_model(3), {"chosen": EXCHANGES, "rejected": other}, PAD, 4, tmp_path, 3, {})
