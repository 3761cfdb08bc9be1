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
