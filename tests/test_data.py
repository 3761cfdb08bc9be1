from __future__ import annotations

import hashlib
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from adpa.core.errors import ConfigError
from adpa.inputs.data import (
    DataError,
    load_preference,
    load_sft,
    normalize_preference_row,
    normalize_sft_row,
)
from adpa.inputs.datagen import check_generated_capacity, generate_datasets, heldout_capacity
from adpa.inputs.tasks import TaskExample, verify
from adpa.workflow.config import load_config

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


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def generated_fingerprint(folder) -> tuple[dict[str, tuple[int, str]], str]:
    """Per split, the row count and a sha256 of the last user turns (the prompts); and one sha256 of every row."""
    prompts, rows_sha = {}, {}
    for name, column in (("sft", "messages"), ("preference", "chosen")):
        for split, rows in datasets.load_from_disk(str(folder / name)).items():
            rows = rows.to_list()
            prompts[f"{name}/{split}"] = (
                len(rows),
                sha256_text("\n".join(row[column][-2]["content"] for row in rows)),
            )
            rows_sha[f"{name}/{split}"] = sha256_text(json.dumps(rows, sort_keys=True))
    return prompts, sha256_text("\n".join(f"{key} {rows_sha[key]}" for key in sorted(rows_sha)))


# Computed before the held-out generator learned to draw beyond its first pass (issue 30): published results
# rest on these data, so a config the first pass satisfied must still give them byte for byte.
CONFIG_HELD_OUT = {
    "test": (256, "ebe6406a9fc278a610a8445f88a0bc5c18acf15a7d6f4e7e71998c796ed6ed68"),
    "validation": (256, "db4d4618974e31f7d55040f3268bf9b5490de3c4b66f9f257426f36ca3adcb2f"),
}
CONFIG_TRAIN = {
    "sft/train": (512, "bf7385b37300ad55ba573da9b92bea22ef1948b75d1844292669e80187f830ef"),
    "preference/train": (512, "6f4a4b1acf51195b2516ab9b2f25c3a8b760c84a5e7107188f11fc4241f91c1b"),
}
TINY_HELD_OUT = {
    "test": (8, "2667265ca657bf77e31cb1dfe952ab2fc753d0731805c33f84681636709c38ca"),
    "validation": (8, "5a3b85004ebefb5c6c4879ae410c35b9d85caf3115630e67624416f8453b6d26"),
}
TINY_TRAIN = {
    "sft/train": (32, "b05c46d1ff7bfa84c1274d240c9aa5310fc34e15a23ade1506d01178a8fa17ca"),
    "preference/train": (32, "89f0f0c7614d7539d8a5becc72e32dbd6b45e942578cb8fbf3d720ae62b2beba"),
}


@pytest.mark.parametrize(
    ("overlay", "held_out", "train", "all_rows"),
    [
        (None, CONFIG_HELD_OUT, CONFIG_TRAIN, "6c5a2400b4fb13af63cf2ec1bddedbab9e3e44689a44a439aa6cae13416d8da0"),
        ("tiny.yaml", TINY_HELD_OUT, TINY_TRAIN, "934cbd139ab234278fc155033fe8027c2e6eb0fb4caf0ee5308b912298c5bf4a"),
        (
            "noisy_pairs.yaml",
            CONFIG_HELD_OUT,
            CONFIG_TRAIN,
            "d3a60f5549fae3326f98e998e4600afecbcad8af1b0234b18ed186fe673d5af7",
        ),
    ],
    ids=["config.yaml", "tiny.yaml", "noisy_pairs.yaml"],
)
def test_generated_data_of_the_shipped_configs_is_pinned(tmp_path, overlay, held_out, train, all_rows):
    files = [REPO / "config" / "config.yaml"] + ([REPO / "config" / overlay] if overlay else [])
    spec = load_config(files)["datasets"]["generate"]
    check_generated_capacity(spec)
    generate_datasets(spec, tmp_path / "sft", tmp_path / "preference")
    prompts, rows_sha = generated_fingerprint(tmp_path)
    expected = {f"{name}/{split}": pin for split, pin in held_out.items() for name in ("sft", "preference")}
    assert prompts == {**expected, **train}
    assert rows_sha == all_rows, "the generated rows changed; published results rest on them"


CONFIG_FAMILIES = "first_letter, small_addition, capitalize_word, plural_word"


def config_spec(**changes) -> dict:
    return {**load_config(REPO / "config" / "config.yaml")["datasets"]["generate"], **changes}


def test_held_out_rows_beyond_the_capacity_are_one_config_error_line(tmp_path):
    spec = config_spec(train_rows=4000)
    line = (
        "config key 'datasets.generate.test_rows': 256 test and 256 validation rows asked, but the families "
        f"{CONFIG_FAMILIES} hold 1969 distinct prompts and the training splits (train_rows 4000, twice) use 1924 "
        "of them: 45 left for the held-out splits; lower train_rows or the held-out rows, or add families"
    )
    with pytest.raises(ConfigError) as checked:
        check_generated_capacity(spec)
    assert str(checked.value) == line
    # The generator, called anyway, refuses with the same line instead of writing short splits.
    with pytest.raises(DataError) as generated:
        generate_datasets(spec, tmp_path / "sft", tmp_path / "preference")
    assert str(generated.value) == line and not (tmp_path / "sft").exists()
    # Everything drawn out: no held-out prompt left at all (these wrote empty splits).
    with pytest.raises(ConfigError, match="use 1969 of them: 0 left for the held-out splits"):
        check_generated_capacity(config_spec(train_rows=20000))


def test_the_key_named_is_validation_rows_when_the_test_split_fits():
    with pytest.raises(ConfigError) as checked:
        check_generated_capacity(config_spec(train_rows=1700))
    assert str(checked.value) == (
        "config key 'datasets.generate.validation_rows': 256 test and 256 validation rows asked, but the families "
        f"{CONFIG_FAMILIES} hold 1969 distinct prompts and the training splits (train_rows 1700, twice) use 1594 "
        "of them: 375 left for the held-out splits; lower train_rows or the held-out rows, or add families"
    )
    with pytest.raises(ConfigError, match=r"^config key 'datasets.generate.test_rows': 400 test rows asked, but"):
        check_generated_capacity(config_spec(train_rows=1700, test_rows=400, validation_rows=0))
    check_generated_capacity(None)  # no generated data: nothing to check


def test_held_out_splits_get_every_row_the_capacity_allows(tmp_path):
    """The first pass (4 candidates a row) falls short here: the generator draws on until the rows are found."""
    spec = {"seed": 2, "train_rows": 300, "multi_turn_fraction": 0.0, "families": ["next_day", "small_addition"]}
    capacity = heldout_capacity(spec)
    left = capacity.left
    assert capacity.prompts == 7 + 405 and capacity.used == 7 + 405 - left
    spec.update(test_rows=left - left // 3, validation_rows=left // 3)
    check_generated_capacity(spec)
    generate_datasets(spec, tmp_path / "sft", tmp_path / "preference")
    splits = datasets.load_from_disk(str(tmp_path / "preference"))
    prompts = {split: [row["chosen"][-2]["content"] for row in rows] for split, rows in splits.items()}
    assert len(prompts["test"]) == len(set(prompts["test"])) == spec["test_rows"]
    assert len(prompts["validation"]) == len(set(prompts["validation"])) == spec["validation_rows"]
    sft_train = {row["messages"][-2]["content"] for row in datasets.load_from_disk(str(tmp_path / "sft"))["train"]}
    train = set(prompts["train"]) | sft_train
    assert not train & set(prompts["test"]) and not train & set(prompts["validation"])
    assert not set(prompts["test"]) & set(prompts["validation"])
    assert len(train) + left == 7 + 405, "every prompt of both families is used"
    with pytest.raises(ConfigError, match=rf"^config key 'datasets.generate.validation_rows'.*: {left} left for"):
        check_generated_capacity({**spec, "validation_rows": spec["validation_rows"] + 1})


def test_an_empty_split_is_named_with_where_it_lives(tmp_path):
    folder = tmp_path / "preference"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"messages": [[USER_1, ANSWER_1]]}),
            "validation": datasets.Dataset.from_dict({"messages": []}),
        }
    ).save_to_disk(str(folder))
    with pytest.raises(DataError) as raised:
        load_sft({"path": str(folder)}, "validation")
    assert str(raised.value) == f"dataset '{folder}' split 'validation' has no rows ({folder / 'validation'})"
    assert len(load_sft({"path": str(folder)}, "train")) == 1, "the other split still loads"
    empty_parquet = tmp_path / "empty.parquet"
    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    pq.write_table(pa.table({"messages": pa.array([], type=message_type)}), empty_parquet)
    with pytest.raises(DataError, match=r"^dataset '.*empty.parquet' split 'train' has no rows \(.*empty.parquet\)$"):
        load_sft({"path": str(empty_parquet)}, "train")
    (tmp_path / "pairs.json").write_text("[]")
    with pytest.raises(DataError, match=r"^dataset '.*pairs.json' split 'train' has no rows \(.*pairs.json\)$"):
        load_preference({"path": str(tmp_path / "pairs.json")}, "train")
    files = tmp_path / "files"
    files.mkdir()
    pq.write_table(pa.table({"messages": pa.array([[USER_1, ANSWER_1]])}), files / "train.parquet")
    pq.write_table(pa.table({"messages": pa.array([], type=message_type)}), files / "test.parquet")
    with pytest.raises(DataError) as raised:
        load_sft({"path": str(files)}, "test")
    assert str(raised.value) == f"dataset '{files}' split 'test' has no rows ({files / 'test.parquet'})"
    assert len(load_sft({"path": str(files)}, "train")) == 1


def test_a_misspelled_split_lists_the_splits_there_are(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"messages": [USER_1, ANSWER_1]}) + "\n")
    with pytest.raises(DataError) as raised:
        load_sft({"path": str(folder)}, "tset")
    assert str(raised.value) == f"dataset '{folder}': no split 'tset' (have: test, train)"
    rows = datasets.Dataset.from_dict({"messages": [[USER_1, ANSWER_1]]})
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError) as raised:
        load_sft({"path": str(tmp_path / "saved")}, "tset")
    assert str(raised.value) == f"dataset '{tmp_path / 'saved'}': no split 'tset' (have: test, train)"


def test_max_train_rows_cuts_the_training_split_only(tmp_path):
    rows = [{"chosen": [USER_1, ANSWER_1], "rejected": [USER_1, {"role": "assistant", "content": "5"}]}] * 10
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "pairs"))
    spec = {"path": str(tmp_path / "pairs"), "train_split": "train", "test_split": "test", "max_train_rows": 2}
    assert len(load_preference(spec, "train")) == 2
    assert len(load_preference(spec, "test")) == 10, "held-out results must not depend on a training setting"


def test_prompt_completion_form_keeps_the_last_assistant_turn_as_completion():
    from adpa.inputs.data import to_prompt_completion

    row = {"messages": [{"role": "system", "content": "s"}, USER_1, ANSWER_1]}
    converted = to_prompt_completion(datasets.Dataset.from_list([row]))
    assert converted[0] == {"prompt": [{"role": "system", "content": "s"}, USER_1], "completion": [ANSWER_1]}


def test_training_prompts_are_those_generate_data_writes(tmp_path):
    """The preflight counts the tokens of generated prompts before the data exist: the same prompts."""
    import yaml

    from adpa.inputs.datagen import generate_datasets, training_prompts
    from adpa.workflow import config as adpa_config

    config = adpa_config.validate_config(yaml.safe_load((REPO / "config" / "tiny.yaml").read_text()))
    spec = {**config["datasets"]["generate"], "multi_turn_fraction": 0.5, "flipped_pair_rates": {"addition": 0.5}}
    generate_datasets(spec, tmp_path / "sft", tmp_path / "preference")
    sft = datasets.load_from_disk(str(tmp_path / "sft"))["train"]
    preference = datasets.load_from_disk(str(tmp_path / "preference"))["train"]
    prompts = training_prompts(spec)
    assert prompts["sft"] == [messages[:-1] for messages in sft["messages"]]
    assert prompts["preference"] == [chosen[:-1] for chosen in preference["chosen"]]
    assert any(len(prompt) > 2 for prompt in prompts["sft"]), "some rows carry an earlier exchange"
