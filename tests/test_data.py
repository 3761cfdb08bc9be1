from __future__ import annotations

import json

import datasets
import pytest

from adpa.data import (
    DataError,
    load_preference,
    load_sft,
    normalize_preference_row,
    normalize_sft_row,
)
from adpa.datagen import generate_datasets
from adpa.tasks import TaskExample, verify

SYSTEM = {"role": "system", "content": "You are terse."}
USER_1 = {"role": "user", "content": "What is 2 + 2?"}
ANSWER_1 = {"role": "assistant", "content": "4"}
USER_2 = {"role": "user", "content": "And times 3?"}


def test_sft_row_keeps_system_and_multi_turn():
    messages = [SYSTEM, USER_1, ANSWER_1, USER_2, {"role": "assistant", "content": "12"}]
    row = {"messages": messages, "prompt_id": "x"}
    assert normalize_sft_row(row, "sft row 0") == {"messages": messages}


@pytest.mark.parametrize(
    "row,fragment",
    [
        ({"text": "hi"}, "missing column 'messages'"),
        ({"messages": [{"role": "human", "content": "hi"}]}, "unknown role 'human'"),
        ({"messages": [USER_1, {"role": "assistant", "content": "  "}]}, "no non-empty assistant turn"),
        ({"messages": [USER_1, {"role": "assistant"}]}, "needs 'role' and 'content'"),
        ({"messages": []}, "non-empty list of messages"),
    ],
)
def test_bad_sft_rows_name_the_row(row, fragment):
    with pytest.raises(DataError, match=fragment) as error:
        normalize_sft_row(row, "data.jsonl row 7")
    assert str(error.value).startswith("data.jsonl row 7")


def test_dpo_mix_form_splits_the_shared_prompt():
    row = {
        "dataset": "x",
        "chosen_rating": 5,
        "chosen": [SYSTEM, USER_1, ANSWER_1, USER_2, {"role": "assistant", "content": "12"}],
        "rejected": [SYSTEM, USER_1, ANSWER_1, USER_2, {"role": "assistant", "content": "13"}],
    }
    normalized = normalize_preference_row(row, "row 0")
    assert normalized["prompt"] == [SYSTEM, USER_1, ANSWER_1, USER_2]
    assert normalized["chosen"] == [{"role": "assistant", "content": "12"}]
    assert normalized["rejected"] == [{"role": "assistant", "content": "13"}]


def test_trl_forms_are_accepted():
    conversational = {"prompt": [USER_1], "chosen": [ANSWER_1], "rejected": [{"role": "assistant", "content": "5"}]}
    text = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    assert normalize_preference_row(conversational, "r") == normalize_preference_row(text, "r")


@pytest.mark.parametrize(
    "row,fragment",
    [
        ({"chosen": [USER_1, ANSWER_1], "rejected": [USER_2, ANSWER_1]}, "different prompts"),
        ({"chosen": [USER_1, ANSWER_1]}, "missing column 'rejected'"),
        ({"chosen": [USER_1, ANSWER_1], "rejected": [USER_1]}, "non-empty assistant message"),
        ({"chosen": [ANSWER_1], "rejected": [ANSWER_1]}, "prompt must end with a user message"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, r"\(chosen\).*non-empty assistant"),
    ],
)
def test_bad_preference_rows_name_the_row(row, fragment):
    with pytest.raises(DataError, match=fragment) as error:
        normalize_preference_row(row, "prefs row 3")
    assert str(error.value).startswith("prefs row 3")


def test_sources_with_tilde_and_spaces(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "preference alignment"
    folder.mkdir()
    rows = [{"chosen": [USER_1, ANSWER_1], "rejected": [USER_1, {"role": "assistant", "content": "5"}]}] * 3
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_preference({"path": "~/preference alignment/pairs.jsonl", "max_train_rows": 2}, "train")
    assert len(loaded) == 2 and loaded[0]["prompt"] == [USER_1]

    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list([{"messages": [USER_1, ANSWER_1]}])}).save_to_disk(
        str(folder / "deita copy")
    )
    assert load_sft({"path": "~/preference alignment/deita copy"}, "train_sft")[0]["messages"] == [USER_1, ANSWER_1]


def test_missing_source_and_split_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_sft({"path": str(tmp_path / "nope here")}, "train")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": [USER_1, ANSWER_1]}])}).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(DataError, match="no split 'train_sft' \\(have: train\\)"):
        load_sft({"path": str(tmp_path / "d")}, "train_sft")


def test_a_bad_row_deep_in_a_file_is_reported_with_its_index(tmp_path):
    rows = [{"messages": [USER_1, ANSWER_1]}] * 5 + [{"messages": [{"role": "bot", "content": "x"}]}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(
        DataError, match=r"sft.jsonl' split 'train': 1 bad row of 6: row 5 \(line 6\): unknown role 'bot'"
    ):
        load_sft({"path": str(path)}, "train")


def test_bad_rows_are_listed_and_dropped_only_when_the_config_says_so(tmp_path, caplog):
    good = {"messages": [USER_1, ANSWER_1]}
    rows = [
        good,
        {"messages": []},
        good,
        {"text": "x"},
        {"messages": [USER_1]},
        {"messages": [{"role": "bot", "content": "x"}]},
    ]
    path = tmp_path / "mixed rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as error:
        load_sft({"path": str(path)}, "train")
    message = str(error.value)
    assert "\n" not in message and "4 bad rows of 6: row 1 (line 2): " in message
    assert "row 3 (line 4): missing column 'messages'" in message
    assert (
        "row 4 (line 5): no non-empty assistant turn" in message and "and 1 more" in message and "row 5" not in message
    )
    kept = load_sft({"path": str(path), "drop_bad_rows": True}, "train")
    assert len(kept) == 2
    assert "dropped 4 bad rows of 6" in caplog.text


def test_generated_data_has_both_forms_and_a_disjoint_held_out_split(tmp_path):
    spec = {"seed": 3, "train_rows": 40, "test_rows": 10, "multi_turn_fraction": 0.3, "families": None}
    generate_datasets(spec, tmp_path / "sft", tmp_path / "preference")
    sft = load_sft({"path": str(tmp_path / "sft")}, "train")
    preference = load_preference({"path": str(tmp_path / "preference")}, "train")
    test = datasets.load_from_disk(str(tmp_path / "preference"))["test"]
    assert len(sft) == 40 and len(preference) == 40 and len(test) == 10
    assert all(row["messages"][0]["role"] == "system" for row in sft)
    assert any(len(row["messages"]) == 5 for row in sft), "some rows are multi-turn"
    train_prompts = {row["prompt"][-1]["content"] for row in preference}
    train_prompts |= {row["messages"][-2]["content"] for row in sft}
    assert not train_prompts & {row["chosen"][-2]["content"] for row in test}
    for row in test:
        example = TaskExample(row["family"], row["chosen"][-2]["content"], row["answer"], "")
        assert verify(example, row["chosen"][-1]["content"])
        assert not verify(example, row["rejected"][-1]["content"])
    # Same spec, same bytes: the generator is seeded.
    generate_datasets(spec, tmp_path / "sft2", tmp_path / "preference2")
    assert (
        datasets.load_from_disk(str(tmp_path / "sft2"))["train"].to_list()
        == datasets.load_from_disk(str(tmp_path / "sft"))["train"].to_list()
    )


def test_mixed_quality_sft_data_validation_split_and_typical_mistakes(tmp_path):
    families = ["uppercase_word", "first_letter"]
    spec = {
        "seed": 1,
        "train_rows": 400,
        "test_rows": 30,
        "validation_rows": 30,
        "multi_turn_fraction": 0.0,
        "families": families,
        "sft_error_rates": {"uppercase_word": 0.6},
        "rejected": "typical_mistake",
    }
    generate_datasets(spec, tmp_path / "sft", tmp_path / "preference")
    sft_splits = datasets.load_from_disk(str(tmp_path / "sft"))
    preference_splits = datasets.load_from_disk(str(tmp_path / "preference"))
    assert set(preference_splits) == {"train", "validation", "test"} and len(preference_splits["validation"]) == 30

    def prompts(rows, column):
        return {row[column][-2]["content"] for row in rows}

    train = prompts(sft_splits["train"], "messages") | prompts(preference_splits["train"], "chosen")
    validation, test = prompts(preference_splits["validation"], "chosen"), prompts(preference_splits["test"], "chosen")
    assert not train & validation and not train & test and not validation & test

    def correct_share(rows, family):
        verdicts = [
            verify(TaskExample(family, "", row["answer"], ""), row["messages"][-1]["content"])
            for row in rows
            if row["family"] == family
        ]
        return sum(verdicts) / len(verdicts)

    # The listed family's SFT answers are mostly its typical mistake; the other family's all correct.
    assert 0.3 < correct_share(sft_splits["train"], "uppercase_word") < 0.5
    assert correct_share(sft_splits["train"], "first_letter") == 1.0
    assert correct_share(sft_splits["test"], "uppercase_word") == 1.0, "held-out SFT answers stay correct"
    for row in preference_splits["train"]:
        example = TaskExample(row["family"], row["chosen"][-2]["content"], row["answer"], "")
        assert verify(example, row["chosen"][-1]["content"]) and not verify(example, row["rejected"][-1]["content"])
        if row["family"] == "uppercase_word":  # the typical mistake: only capitalized
            assert row["rejected"][-1]["content"] == row["answer"].capitalize()


def test_flipped_pairs_swap_train_labels_only_and_leave_other_data_unchanged(tmp_path):
    spec = {
        "seed": 3,
        "train_rows": 400,
        "test_rows": 40,
        "validation_rows": 40,
        "multi_turn_fraction": 0.1,
        "families": ["uppercase_word", "first_letter"],
        "sft_error_rates": {"uppercase_word": 0.5},
        "rejected": "typical_mistake",
    }
    generate_datasets(spec, tmp_path / "clean_sft", tmp_path / "clean")
    generate_datasets({**spec, "flipped_pair_rates": {"uppercase_word": 0.4}}, tmp_path / "sft", tmp_path / "noisy")
    clean, noisy = datasets.load_from_disk(str(tmp_path / "clean")), datasets.load_from_disk(str(tmp_path / "noisy"))
    # The SFT data and the held-out pairs are the same rows, byte for byte: the flips draw from their own generator.
    assert datasets.load_from_disk(str(tmp_path / "sft"))["train"].to_list() == (
        datasets.load_from_disk(str(tmp_path / "clean_sft"))["train"].to_list()
    )
    for split in ("validation", "test"):
        assert noisy[split].to_list() == clean[split].to_list()
    flipped = {"uppercase_word": 0, "first_letter": 0}
    for before, after in zip(clean["train"], noisy["train"], strict=True):
        if after["chosen"] != before["chosen"]:
            assert (after["chosen"], after["rejected"]) == (before["rejected"], before["chosen"])
            flipped[after["family"]] += 1
    uppercase_rows = sum(row["family"] == "uppercase_word" for row in clean["train"])
    assert flipped["first_letter"] == 0 and 0.3 < flipped["uppercase_word"] / uppercase_rows < 0.5


def test_unknown_family_in_error_rates_is_refused(tmp_path):
    spec = {
        "seed": 1,
        "train_rows": 4,
        "test_rows": 2,
        "multi_turn_fraction": 0.0,
        "families": None,
        "sft_error_rates": {"uppercase": 0.5},
    }
    with pytest.raises(DataError, match="sft_error_rates': unknown task family 'uppercase'"):
        generate_datasets(spec, tmp_path / "sft", tmp_path / "preference")


def test_max_train_rows_cuts_the_training_split_only(tmp_path):
    rows = [{"chosen": [USER_1, ANSWER_1], "rejected": [USER_1, {"role": "assistant", "content": "5"}]}] * 10
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "pairs"))
    spec = {"path": str(tmp_path / "pairs"), "train_split": "train", "test_split": "test", "max_train_rows": 2}
    assert len(load_preference(spec, "train")) == 2
    assert len(load_preference(spec, "test")) == 10, "held-out results must not depend on a training setting"


def test_prompt_completion_form_keeps_the_last_assistant_turn_as_completion():
    from adpa.data import to_prompt_completion

    row = {"messages": [{"role": "system", "content": "s"}, USER_1, ANSWER_1]}
    converted = to_prompt_completion(datasets.Dataset.from_list([row]))
    assert converted[0] == {"prompt": [{"role": "system", "content": "s"}, USER_1], "completion": [ANSWER_1]}
