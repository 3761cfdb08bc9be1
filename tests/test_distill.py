"""The control chosen_sft and the ablation adpa_no_ref against dense references, on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adpa.infer.inference import write_advantage
from adpa.modeling.sequences import Exchange
from adpa.training.distill import DistillationCollator, _distillation_trainer_class
from adpa.training.topk_store import TopKStore

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
    from adpa.dag.objectives import sequences_of
    from adpa.training.losses import TopKBatch, adpa_loss, dckd_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    parts = []
    size = logits.shape[0] // len(sequences_of(objective))
    for index in range(len(sequences_of(objective))):
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


@pytest.mark.parametrize("loss_chunk_tokens", [1024, 2], ids=["one-chunk", "chunks-of-2"])
@pytest.mark.parametrize("softcapped", [False, True], ids=["response-positions-head", "full-logits-fallback"])
@pytest.mark.parametrize("objective", ["dckd", "adpa"])
def test_loss_and_gradients_equal_the_full_logit_computation(tmp_path, objective, softcapped, loss_chunk_tokens):
    """The head projects only the response positions (or, for a head that transforms its logits, the
    full logits are gathered), all at once or in chunks of 2 of the 3 positions (each recomputed in the
    backward): same loss and gradients as from the logits of every position."""
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
        loss_chunk_tokens=loss_chunk_tokens,
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
    from adpa.infer.inference import write_teacher_topk

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
    from adpa.core.errors import InputError
    from adpa.infer.inference import write_teacher_topk

    other = [EXCHANGES[0], Exchange([11, 99, 13, 14], 2), EXCHANGES[2]]
    with pytest.raises(InputError, match="chosen and rejected row 1: different prompts"):
        write_teacher_topk(tiny_model(3), {"chosen": EXCHANGES, "rejected": other}, PAD, 4, tmp_path, 3, {})


def distillation_loss(model, batch, objective: str, weights: dict, inputs: dict | None = None) -> torch.Tensor:
    """The path DistillationTrainer.compute_loss runs, called directly: the model's forward at the
    batch's `logit_positions` (padded: attention_mask; padding-free: position_ids), the batch cut into
    its sequences, the objective's loss. `inputs` overrides the model inputs (the negative controls)."""
    from adpa.dag.objectives import sequences_of
    from adpa.modeling.lm_head import dense_lm_head, positions_logits
    from adpa.training.distill import split_sequences
    from adpa.training.losses import adpa_loss, dckd_loss, vanilla_kd_loss

    if inputs is None:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    if dense_lm_head(model):  # the patched forward runs the decoder with use_cache=False
        logits = model(**inputs, logit_positions=batch["logit_positions"]).logits
    else:  # a head that transforms its logits: the full logits, gathered
        # use_cache=False: with a cache (the config's default) transformers does not look for packed
        # sequences in position_ids, and a padding-free batch's sequences would attend to each other.
        logits = positions_logits(model, batch["logit_positions"], **inputs, use_cache=False)[0]
    sequences = split_sequences(logits, batch, sequences_of(objective))
    chosen = sequences["chosen"]
    if objective == "vanilla_kd":
        return vanilla_kd_loss(
            chosen_logits=chosen.logits,
            chosen_labels=chosen.labels,
            chosen_mask=chosen.mask,
            chosen_topk=chosen.topk,
            **weights,
        )
    if objective == "dckd":
        rejected = sequences["rejected"]
        return dckd_loss(
            chosen_logits=chosen.logits,
            chosen_labels=chosen.labels,
            chosen_mask=chosen.mask,
            chosen_topk=chosen.topk,
            rejected_logits=rejected.logits,
            rejected_mask=rejected.mask,
            rejected_topk=rejected.topk,
            **weights,
        )
    own = sequences["own"]
    return adpa_loss(
        chosen_logits=chosen.logits,
        chosen_labels=chosen.labels,
        chosen_mask=chosen.mask,
        own_logits=own.logits,
        own_mask=own.mask,
        own_advantage=own.topk,
        **weights,
    )


PADDING_FREE_WEIGHTS = {
    "dckd": {"nll_weight": 1.0, "chosen_kl_weight": 0.5, "rejected_kl_weight": 0.2},
    "vanilla_kd": {"nll_weight": 1.0, "kl_weight": 0.5},
    "adpa": {"nll_weight": 1.0, "adpa_weight": 0.7},
}


def padding_free_stores(tmp_path, objective: str) -> dict:
    """Real stores for EXCHANGES (chosen) and REJECTED (rejected, or the student's own responses)."""
    from adpa.infer.inference import write_teacher_topk

    if objective == "adpa":
        write_advantage(tiny_model(1), tiny_model(2), REJECTED, PAD, 4, tmp_path / "advantage", 3, {})
        return {"chosen": None, "own": TopKStore(tmp_path / "advantage")}
    write_teacher_topk(tiny_model(3), {"chosen": EXCHANGES, "rejected": REJECTED}, PAD, 4, tmp_path, 2, {})
    names = ("chosen", "rejected") if objective == "dckd" else ("chosen",)
    return {name: TopKStore(tmp_path / name) for name in names}


@pytest.mark.parametrize("head", ["response-positions-head", "full-logits-fallback"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("objective", ["dckd", "adpa", "vanilla_kd"])
def test_padding_free_batch_loss_and_gradients_equal_the_padded_batch(tmp_path, objective, attention, head):
    """The S*B sequences concatenated into one row, kept apart by position_ids restarting at 0 with no
    attention_mask (transformers then builds a block-causal mask), give the padded batch's loss and
    gradients. The negative controls show the test sees a leak: the same packed row with a plain causal
    mask (an all-ones attention_mask turns off the packing detection), or with position_ids that do not
    restart, lets each sequence attend to the ones before it, and the loss differs."""
    from adpa.dag.objectives import sequences_of

    stores = padding_free_stores(tmp_path, objective)
    exchanges = {name: {"chosen": EXCHANGES}.get(name, REJECTED) for name in sequences_of(objective)}
    features = [{"row": row} for row in range(len(EXCHANGES))]
    for name, rows in exchanges.items():
        for feature, exchange in zip(features, rows):
            feature.update({f"{name}_ids": exchange.input_ids, f"{name}_start": exchange.response_start})
    padded = DistillationCollator(PAD, stores)(features)
    packed = DistillationCollator(PAD, stores, padding_free=True)(features)
    lengths = [len(exchange.input_ids) for rows in exchanges.values() for exchange in rows]
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(lengths)), "no padding"
    assert torch.equal(packed["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
    assert packed["logit_positions"].shape == padded["logit_positions"].shape
    for key in ("labels", "response_mask", "topk_ids", "topk_values", "topk_rest"):
        assert torch.equal(packed[key], padded[key]), key

    models = {}
    for layout in ("padded", "packed"):
        models[layout] = tiny_model(0)
        models[layout].set_attn_implementation(attention)
        if head == "full-logits-fallback":
            models[layout].config.final_logit_softcapping = 50.0
    weights = PADDING_FREE_WEIGHTS[objective]
    expected = distillation_loss(models["padded"], padded, objective, weights)
    loss = distillation_loss(models["packed"], packed, objective, weights)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    expected.backward()
    for (name, got), (_, want) in zip(models["packed"].named_parameters(), models["padded"].named_parameters()):
        assert torch.allclose(got.grad, want.grad, atol=1e-5), name

    with torch.no_grad():
        ids, restarting = packed["input_ids"], packed["position_ids"]
        one_causal_mask = {"input_ids": ids, "position_ids": restarting, "attention_mask": torch.ones_like(ids)}
        not_restarting = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None, :]}
        for leaking in (one_causal_mask, not_restarting):
            leaked = distillation_loss(models["packed"], packed, objective, weights, inputs=leaking)
            assert abs(leaked.item() - expected.item()) > 1e-3, "a leak between sequences changes the loss"


@pytest.mark.parametrize("objective", ["vanilla_kd", "adpa"])
def test_trainer_loss_in_chunks_of_a_padding_free_batch_equals_the_padded_batch_at_once(tmp_path, objective):
    """DistillationTrainer.compute_loss hands the model the batch's own inputs (a padding-free batch's
    position_ids) and projects the head in chunks of 2 response positions: the padded batch's loss and
    gradients with all positions projected at once."""
    from transformers import TrainingArguments

    from adpa.dag.objectives import sequences_of

    stores = padding_free_stores(tmp_path, objective)
    features = [{"row": row} for row in range(len(EXCHANGES))]
    for name in sequences_of(objective):
        for feature, exchange in zip(features, {"chosen": EXCHANGES}.get(name, REJECTED)):
            feature.update({f"{name}_ids": exchange.input_ids, f"{name}_start": exchange.response_start})
    results = []
    for padding_free, loss_chunk_tokens in ((False, 1024), (True, 2)):
        batch = DistillationCollator(PAD, stores, padding_free=padding_free)(features)
        assert batch["logit_positions"].shape[1] > 2, "several chunks of 2"
        model = tiny_model(0)
        trainer = _distillation_trainer_class()(
            model=model,
            args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[]),
            objective=objective,
            weights=PADDING_FREE_WEIGHTS[objective],
            loss_chunk_tokens=loss_chunk_tokens,
        )
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results.append((loss.item(), dict(model.named_parameters())))
    (expected, padded), (got, packed) = results
    assert got == pytest.approx(expected, abs=1e-5)
    for name, parameter in packed.items():
        assert torch.allclose(parameter.grad, padded[name].grad, atol=1e-5), name
