"""The dense LM head gives TRL's fused-head outputs and gradients, and leaves the plain forward alone."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).float()


FIELDS = ("loss", "log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs", "label_mask")


@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_same_outputs_and_gradients_as_trl_fused_head(model, num_items_in_batch):
    from trl.trainer.utils import add_fused_lm_head

    from adpa.modeling.lm_head import dense_lm_head

    trl_model, dense_model = copy.deepcopy(model), copy.deepcopy(model)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    add_fused_lm_head(dense_model)  # as the trainers do; then replaced
    assert dense_lm_head(dense_model)
    ids = torch.randint(0, 300, (3, 12))
    labels = ids.masked_fill(torch.rand(3, 12) < 0.5, -100)  # prompt/padding positions
    kwargs = {"input_ids": ids, "labels": labels, "fused_lm_head": True, "num_items_in_batch": num_items_in_batch}
    expected, got = trl_model(**kwargs), dense_model(**kwargs)
    for field in FIELDS:
        assert torch.allclose(getattr(expected, field).float(), getattr(got, field).float(), atol=1e-5), field
    expected.loss.backward()
    got.loss.backward()
    for (name, a), (_, b) in zip(trl_model.named_parameters(), dense_model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_plain_forward_is_the_models_own(model):
    from adpa.modeling.lm_head import dense_lm_head

    patched = copy.deepcopy(model)
    dense_lm_head(patched)
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(patched(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.allclose(patched(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)


def test_heads_that_transform_logits_keep_trl(model):
    from adpa.modeling.lm_head import dense_lm_head

    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0
    forward = capped.forward
    assert not dense_lm_head(capped) and capped.forward == forward


def test_a_wrapped_model_is_patched_inside_its_wrapper(model):
    """DPOTrainer hands the reference over inside DeepSpeed's engine, whose `config` is a dict."""
    from adpa.modeling.lm_head import dense_lm_head

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"zero_optimization": {"stage": 3}}

    inner = copy.deepcopy(model)
    assert dense_lm_head(Engine(inner))
    ids = torch.randint(0, 300, (1, 6))
    assert inner(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.shape == (1, 5)


def test_batches_too_large_for_one_projection_go_to_trls_tiled_head(model, monkeypatch):
    """Above DENSE_HEAD_MAX_LOGITS the dense head hands the batch to the tiled head TRL added (no
    [positions, vocab] fp32 tensor at paper scale); below it, its own single projection."""
    from trl.trainer.utils import add_fused_lm_head

    from adpa.modeling import lm_head

    patched = copy.deepcopy(model)
    add_fused_lm_head(patched)
    calls = []
    tiled = patched.forward
    patched.forward = lambda *args, **kwargs: calls.append(kwargs) or tiled(*args, **kwargs)
    assert lm_head.dense_lm_head(patched)
    ids = torch.randint(0, 300, (2, 10))
    kwargs = {"input_ids": ids, "labels": ids, "fused_lm_head": True}
    small = patched(**kwargs)
    assert calls == []
    monkeypatch.setattr(lm_head, "DENSE_HEAD_MAX_LOGITS", 2 * 10 * 300 - 1)
    large = patched(**kwargs)
    assert len(calls) == 1 and calls[0]["fused_lm_head"] is True
    assert torch.allclose(large.loss, small.loss, atol=1e-5)


def test_a_rank_with_fewer_positions_makes_as_many_chunks_as_the_others(monkeypatch):
    """Under ZeRO-3 each head call gathers its weight with every rank: a rank with fewer positions adds
    empty chunks up to the largest count (all_reduce MAX), which change no sum and no gradient."""
    from adpa.modeling import lm_head

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 10, 8, requires_grad=True)
    calls = []

    def sums(logits, span):
        calls.append(logits.shape[1])
        return {"logz": torch.logsumexp(logits.float(), -1).sum(-1)}

    alone = lm_head.sum_over_position_chunks(hidden, head, sums, chunk_positions=4)["logz"]
    assert calls == [4, 4, 2]
    (grad_alone,) = torch.autograd.grad(alone.sum(), hidden)
    calls.clear()
    monkeypatch.setattr(lm_head, "_chunks_of_all_ranks", lambda chunks, device: 5)  # another rank has 5
    padded = lm_head.sum_over_position_chunks(hidden, head, sums, chunk_positions=4)["logz"]
    assert calls == [4, 4, 2, 0, 0]
    (grad_padded,) = torch.autograd.grad(padded.sum(), hidden)
    assert torch.allclose(padded, alone) and torch.allclose(grad_padded, grad_alone)
