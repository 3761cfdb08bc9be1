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

    from adpa.lm_head import dense_lm_head

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
    from adpa.lm_head import dense_lm_head

    patched = copy.deepcopy(model)
    dense_lm_head(patched)
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(patched(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.allclose(patched(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)


def test_heads_that_transform_logits_keep_trl(model):
    from adpa.lm_head import dense_lm_head

    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0
    forward = capped.forward
    assert not dense_lm_head(capped) and capped.forward == forward


def test_a_wrapped_model_is_patched_inside_its_wrapper(model):
    """DPOTrainer hands the reference over inside DeepSpeed's engine, whose `config` is a dict."""
    from adpa.lm_head import dense_lm_head

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"zero_optimization": {"stage": 3}}

    inner = copy.deepcopy(model)
    assert dense_lm_head(Engine(inner))
    ids = torch.randint(0, 300, (1, 6))
    assert inner(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.shape == (1, 5)
