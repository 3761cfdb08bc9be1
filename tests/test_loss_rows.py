"""No stage learns from nothing: the loss-token count before training and the idle-run check after it."""

from __future__ import annotations

import math

import datasets
import pytest

from adpa.core.errors import InputError
from adpa.training.loss_rows import NoLossTokensError, require_loss_tokens, rows_with_loss_tokens
from adpa.training.train import NothingLearnedError, check_learned


class FakeTrainer:
    def __init__(self, rows: dict[str, list]):
        self.train_dataset = datasets.Dataset.from_dict(rows)


class FakeTokenizer:
    """One token per character of each message, plus 3 for the generation prompt."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        return {"input_ids": [0] * (sum(len(message["content"]) for message in messages) + 3)}


def test_rows_need_a_loss_token_in_every_label_column():
    sft = {"input_ids": [[1, 2], [1, 2]], "labels": [[-100, 5], [-100, -100]]}
    assert rows_with_loss_tokens(list(sft), datasets.Dataset.from_dict(sft)) == [True, False]
    pairs = {"chosen_labels": [[-100, 4], [-100, 4]], "rejected_labels": [[-100, 3], [-100]]}
    assert rows_with_loss_tokens(list(pairs), datasets.Dataset.from_dict(pairs)) == [True, False]
    dpo = {"prompt_ids": [[1], [2]], "chosen_ids": [[3], [4]]}  # TRL's DPO rows: filtered by TRL itself
    assert rows_with_loss_tokens(list(dpo), datasets.Dataset.from_dict(dpo)) == [True, True]


def test_no_row_left_is_one_error_line_naming_stage_key_and_lengths():
    trainer = FakeTrainer({"input_ids": [[1]], "labels": [[-100]]})
    prompts = [[{"role": "user", "content": "a" * 20}], [{"role": "user", "content": "b" * 9}]]
    with pytest.raises(NoLossTokensError) as error:
        require_loss_tokens("student_sft", "student_sft.max_length", 12, trainer, 2, FakeTokenizer(), prompts)
    assert str(error.value) == (
        "student_sft: none of the 2 training rows keeps a loss token within student_sft.max_length = 12; "
        "the shortest prompt has 12 tokens; raise student_sft.max_length"
    )
    assert isinstance(error.value, InputError) and "\n" not in str(error.value)
    # TRL already dropped every row (SFTTrainer, DPOTrainer): the same line.
    empty = FakeTrainer({"input_ids": [], "labels": []})
    with pytest.raises(NoLossTokensError, match="none of the 3 training rows"):
        require_loss_tokens("dpo_teacher", "dpo_teacher.max_length", 8, empty, 3)


def test_some_rows_dropped_is_a_warning_and_the_trainer_keeps_the_rest(caplog):
    trainer = FakeTrainer({"chosen_labels": [[-100, 4], [-100], [7]], "rejected_labels": [[-100, 3], [3], [-100, 2]]})
    facts = require_loss_tokens("simpo", "simpo.max_length", 16, trainer, 3)
    assert facts == {"train_rows": 2, "rows_without_loss_tokens": 1}
    assert trainer.train_dataset["chosen_labels"] == [[-100, 4], [7]]
    assert (
        "simpo: 1 of 3 training rows keep no loss token within simpo.max_length = 16 and are left out" in caplog.text
    )
    # TRL dropped rows before we counted: still counted against the rows given.
    assert require_loss_tokens("student_sft", "student_sft.max_length", 16, FakeTrainer({"labels": [[1]]}), 4) == {
        "train_rows": 1,
        "rows_without_loss_tokens": 3,
    }


@pytest.mark.parametrize(
    "history, idle",
    [
        ([{"loss": 0.0, "grad_norm": 0.0, "step": 1}, {"loss": 0.0, "grad_norm": 0.0, "step": 2}], True),
        ([{"loss": math.nan, "grad_norm": 1.0, "step": 1}], True),
        ([{"loss": 1.0, "grad_norm": math.inf, "step": 1}], True),
        ([{"train_loss": 0.0, "step": 1}], True),  # fewer steps than logging_steps
        ([{"loss": 0.0, "grad_norm": 0.0}, {"loss": 0.3, "grad_norm": 2.0}], False),
        ([{"loss": 0.0, "grad_norm": 0.5}], False),  # a zero loss with a gradient is still learning
        ([{"train_loss": 0.7}], False),
        ([], False),
    ],
)
def test_a_run_that_learned_nothing_is_not_published(history, idle):
    if idle:
        with pytest.raises(NothingLearnedError, match="student_sft: loss and gradient norm were 0 or not finite"):
            check_learned("student_sft", history)
    else:
        check_learned("student_sft", history)


def test_packed_rows_are_counted_inside_their_packs(caplog):
    """SFT packing truncates each row to max_length inside its pack: an all-prompt row trains on nothing."""
    packs = {
        "input_ids": [[1] * 5, [1] * 4, [1] * 3],
        "labels": [[-100, 7, -100, -100, -100], [-100] * 4, [-100, -100, 9]],
        "seq_lengths": [[2, 3], [4], [1, 2]],
    }
    trainer = FakeTrainer(packs)
    facts = require_loss_tokens("ref_teacher", "ref_teacher.max_length", 5, trainer, 5)
    # Rows: [-100, 7] yes, [-100]*3 no, [-100]*4 no, [-100] no, [-100, 9] yes.
    assert facts == {"train_rows": 2, "rows_without_loss_tokens": 3}
    assert trainer.train_dataset["seq_lengths"] == [[2, 3], [1, 2]], "a pack with no loss token is left out"
    with pytest.raises(NoLossTokensError, match="none of the 2 training rows"):
        require_loss_tokens(
            "ref_teacher",
            "ref_teacher.max_length",
            5,
            FakeTrainer({**packs, "labels": [[-100] * 5, [-100] * 4, [-100] * 3]}),
            2,
        )


def test_errors_name_the_key_the_stage_reads_its_max_length_from():
    from adpa.dag.stages import max_length_key

    assert (
        max_length_key("student_sft") == "student_sft.max_length" and max_length_key("adpa_plus") == "adpa.max_length"
    )
    assert max_length_key("vanilla_kd") == "dckd.max_length", "vanilla_kd reads the top-k store cut at dckd's length"
    assert max_length_key("teacher_topk") == "dckd.max_length" and max_length_key("advantage") == "adpa.max_length"
    assert max_length_key("evaluate") is None
