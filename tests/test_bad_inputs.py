"""Bad input, table-driven: each case is one scratch change to config/tiny.yaml (or to a file it
names) and the one `error:` line it must give before any job runs.

Every case runs through `python -m adpa check` (in process: exit code 2, exactly one `error:`
line, no traceback). The file cases also start a real `snakemake --cores 1` (the onstart
preflight), which must stop with the same line before any job wrote results/ or logs/.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_workflow, run_snakemake

from adpa import cli

USER = {"role": "user", "content": "Capitalize 'apple'."}
ANSWER = {"role": "assistant", "content": "Apple"}
GOOD_SFT = {"messages": [USER, ANSWER]}
GOOD_PAIR = {"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "apple"}]}
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


def jsonl(path: Path, rows: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sft_file(rows: list) -> Callable[[Path, dict], None]:
    """The SFT dataset replaced by a JSONL file of these rows (a single file: no held-out split)."""

    def setup(folder: Path, config: dict) -> None:
        config["datasets"]["sft"] = {"path": jsonl(folder / "data" / "sft.jsonl", rows), "test_split": None}

    return setup


def sft_path(make: Callable[[Path], Path]) -> Callable[[Path, dict], None]:
    def setup(folder: Path, config: dict) -> None:
        config["datasets"]["sft"] = {"path": str(make(folder)), "test_split": None}

    return setup


def preference_rows(rows: list) -> Callable[[Path, dict], None]:
    """The preference dataset replaced by a folder: these rows as train.jsonl, a good test.jsonl."""

    def setup(folder: Path, config: dict) -> None:
        jsonl(folder / "pairs" / "train.jsonl", rows)
        jsonl(folder / "pairs" / "test.jsonl", [GOOD_PAIR])
        config["datasets"]["preference"] = {"path": str(folder / "pairs")}

    return setup


def local_model(role: str, files: dict[str, bytes], **config_keys) -> Callable[[Path, dict], None]:
    """The base `role` (student, teacher) replaced by a local folder holding these files; other top-level keys set."""

    def setup(folder: Path, config: dict) -> None:
        model = folder / "models" / role
        model.mkdir(parents=True)
        for name, content in files.items():
            (model / name).write_bytes(content)
        config["models"][f"base_{role}"] = {"path": str(model)}
        config.update(config_keys)

    return setup


def student_folder(files: dict[str, bytes]) -> Callable[[Path, dict], None]:
    return local_model("student", files)


def edit(change: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    return lambda folder, config: change(config)


def both_setups(*setups: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    def setup(folder: Path, config: dict) -> None:
        for one in setups:
            one(folder, config)

    return setup


def written(text: str | bytes) -> Callable[[Path, dict], str | bytes]:
    """The config file itself replaced by this text."""
    return lambda folder, config: text


TINY_TEXT = (REPO / "config" / "tiny.yaml").read_text()


def tiny_with(extra: str) -> str:
    return TINY_TEXT + extra


def nested(keys: str, value) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        *parents, last = keys.split(".")
        target = config
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value

    return change


def both(*changes: Callable[[dict], None]) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        for one in changes:
            one(config)

    return change


def work_dir_file(folder: Path, config: dict) -> None:
    (folder / "afile").write_text("x")
    config["work_dir"] = str(folder / "afile")


MODEL_CONFIG = b'{"model_type": "llama"}'


def _weights() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(1)})


def _tokenizer_files(chat_template: str | None) -> dict[str, bytes]:
    """A one-word tokenizer's files (tokenizer.json, tokenizer_config.json), with or without a chat template."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # one token per word: prompt lengths follow their text
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in Path(folder).iterdir()}


WEIGHTS = _weights()


@dataclass
class Case:
    name: str
    setup: Callable
    error: str  # regex the one error line must match (after "error: ")
    snakemake: bool = False  # also through a real `snakemake` start
    key: str | None = None  # the key whose check (adpa/workflow/checks.py) it trips; default: the key its line names

    @property
    def checked_key(self) -> str | None:
        named = re.match(r"config key '([^']+)'", self.error)
        return self.key or (named.group(1).replace("\\", "") if named else None)


def preference_splits(**splits: list) -> Callable[[Path, dict], None]:
    """The preference dataset replaced by a folder of these splits (split name -> rows), each a JSON list file."""

    def setup(folder: Path, config: dict) -> None:
        for split, rows in splits.items():
            (folder / "pairs").mkdir(parents=True, exist_ok=True)
            (folder / "pairs" / f"{split}.json").write_text(json.dumps(rows))
        config["datasets"]["preference"] = {"path": str(folder / "pairs")}

    return setup


CASES = [
    # Config files
    Case("empty config file", written(""), r"config: 'models' is a required property"),
    Case("config without datasets", written("models: {}\n"), r"config: 'datasets' is a required property"),
    Case(
        "config is a YAML list",
        written("- a\n- b\n"),
        r"config file '.*': expected a mapping of config keys, got a list",
    ),
    Case(
        "config is a scalar",
        written("42\n"),
        r"config file '.*': expected a mapping of config keys, got a single value",
    ),
    Case("invalid YAML", written("models: [\n"), r"config file '.*': invalid YAML: line 2, column 1: "),
    Case("non-UTF-8 config", written(b"run_name: caf\xe9\n"), r"config file '.*': not UTF-8 text"),
    Case(
        "section written twice",
        written(tiny_with("dpo_teacher:\n  beta: 0.2\n")),
        r"config file '.*': invalid YAML: line \d+, column 1: key 'dpo_teacher' written twice",
        snakemake=True,
    ),
    Case(
        "learning rate .nan",
        written(TINY_TEXT.replace("learning_rate: 1.0e-4", "learning_rate: .nan", 1)),
        r"config key 'dpo_teacher.learning_rate': must be a finite number, got nan",
    ),
    Case(
        "learning rate .inf",
        edit(nested("dckd.learning_rate", float("inf"))),
        r"config key 'dckd.learning_rate': must be a finite number, got inf",
    ),
    Case(
        "unknown key",
        edit(nested("dpo_teacher.betta", 0.1)),
        r"config key 'dpo_teacher.betta': unknown key; did you mean 'beta'\?",
    ),
    Case(
        "run_name with a path",
        edit(nested("run_name", "../../x/y")),
        r"config key 'run_name': '../../x/y' must be a plain name",
    ),
    Case(
        "run_name with a slash", edit(nested("run_name", "a/b")), r"config key 'run_name': 'a/b' must be a plain name"
    ),
    Case("work_dir is a file", work_dir_file, r"config key 'work_dir': .*afile is a file, not a folder"),
    Case(
        "batch not divisible",
        edit(nested("ref_teacher.effective_batch_size", 7)),
        r"config key 'ref_teacher.effective_batch_size': 7 is not a multiple of per_device_batch_size x processes",
    ),
    Case(
        "missing accelerate config",
        edit(nested("launch.accelerate_config", "config/accelerate/nope.yaml")),
        r"config key 'launch.accelerate_config': no such file: .*nope.yaml",
    ),
    # Dataset files
    Case(
        "invalid JSON line",
        sft_path(lambda f: (f / "bad.jsonl", (f / "bad.jsonl").write_text('{"messages": [}\n'))[0]),
        r"dataset '.*bad.jsonl': bad.jsonl line 1: invalid JSON \(Expecting value\)",
        snakemake=True,
    ),
    Case(
        "empty dataset file",
        sft_path(lambda f: (f / "empty.jsonl", (f / "empty.jsonl").write_text(""))[0]),
        r"dataset '.*empty.jsonl': empty.jsonl is empty",
        snakemake=True,
    ),
    Case(
        "file of blank lines",
        sft_path(lambda f: (f / "blank.jsonl", (f / "blank.jsonl").write_text("\n  \n\n"))[0]),
        r"dataset '.*blank.jsonl': blank.jsonl is empty",
    ),
    Case(
        "empty dataset folder",
        sft_path(lambda f: (f / "empty folder", (f / "empty folder").mkdir())[0]),
        r"dataset '.*empty folder': no data files .* in folder",
        snakemake=True,
    ),
    Case(
        "folder of mixed data files",
        sft_path(
            lambda f: (
                f / "mixed",
                (f / "mixed").mkdir(),
                jsonl(f / "mixed" / "train.jsonl", [GOOD_SFT]),
                (f / "mixed" / "train.csv").write_text("messages\nx\n"),
            )[0]
        ),
        r"dataset '.*mixed': split 'train' mixes data file types \(.csv, .jsonl\) in .*mixed; keep one",
    ),
    Case(
        "JSON row that is not an object",
        sft_file([GOOD_SFT, [1, 2]]),
        r"dataset '.*sft.jsonl': line 2: expected a JSON object per row, got list",
    ),
    Case(
        "one non-string content",
        sft_file([GOOD_SFT] * 5 + [{"messages": [USER, {"role": "assistant", "content": 5}]}]),
        r"split 'train': 1 bad row of 6: row 5 \(line 6\): message content must be text, got int",
    ),
    Case(
        "last assistant turn empty",
        sft_file([GOOD_SFT, {"messages": [USER, ANSWER, USER, {"role": "assistant", "content": " "}]}]),
        r"1 bad row of 2: row 1 \(line 2\): the conversation must end with a non-empty assistant turn",
    ),
    Case(
        "conversation ends with the user",
        sft_file([GOOD_SFT, {"messages": [USER, ANSWER, USER]}]),
        r"1 bad row of 2: row 1 \(line 2\): the conversation must end with a non-empty assistant turn",
    ),
    Case(
        "no user turn",
        sft_file([GOOD_SFT, {"messages": [{"role": "system", "content": "s"}, ANSWER]}]),
        r"1 bad row of 2: row 1 \(line 2\): no user turn",
    ),
    Case(
        "empty user turn",
        sft_file([GOOD_SFT, {"messages": [{"role": "user", "content": ""}, ANSWER]}]),
        r"1 bad row of 2: row 1 \(line 2\): an empty user turn",
    ),
    Case(
        "prompt column disagrees with chosen",
        preference_rows([GOOD_PAIR, {"prompt": "Capitalize 'pear'.", **GOOD_PAIR}]),
        r"1 bad row of 2: row 1 \(train.jsonl line 2\): the 'chosen' conversation does not start with the row's 'prompt'",
    ),
    Case(
        "chosen equals rejected",
        preference_rows([GOOD_PAIR, {"chosen": [USER, ANSWER], "rejected": [USER, ANSWER]}]),
        r"1 bad row of 2: row 1 \(train.jsonl line 2\): chosen and rejected responses are identical",
        snakemake=True,
    ),
    # Models
    Case(
        "missing local model folder",
        edit(nested("models.base_student", {"path": "/nonexistent/my models/student"})),
        r"config key 'models.base_student.path': no such file or directory: /nonexistent/my models/student",
    ),
    Case(
        "relative model path that does not exist",
        edit(nested("models.base_student", {"path": "mymodels/student"})),
        r"config key 'models.base_student.path': 'mymodels/student' is not a local folder \(no such folder: .*mymodels/student\) "
        r"and the hub cannot be reached .*hf download mymodels/student",
        snakemake=True,
    ),
    Case(
        "model folder with a corrupt config.json",
        student_folder({"config.json": b"{not json", "model.safetensors": b""}),
        r"config key 'models.base_student.path': model '.*student': .*config.json is not readable JSON",
    ),
    Case(
        "model folder with an empty config.json",
        student_folder({"config.json": b"{}", "model.safetensors": b""}),
        r"config key 'models.base_student.path': model '.*student': .*config.json has no 'model_type'",
    ),
    Case(
        "model folder with only pytorch_model.bin",
        student_folder({"config.json": MODEL_CONFIG, "pytorch_model.bin": b"pickle"}),
        r"config key 'models.base_student.path': model '.*student': only pickle weights \(pytorch_model.bin\)",
        snakemake=True,
    ),
    Case(
        "model folder without weights",
        student_folder({"config.json": MODEL_CONFIG}),
        r"config key 'models.base_student.path': model '.*student': no weights \(\*.safetensors\)",
    ),
    Case(
        "truncated safetensors",
        student_folder({"config.json": MODEL_CONFIG, "model.safetensors": b'\x40\x00\x00\x00\x00\x00\x00\x00{"a"'}),
        r"config key 'models.base_student.path': model '.*student': model.safetensors is not a readable safetensors file",
        snakemake=True,
    ),
    # Model folders that look complete but do not load (checked the way the jobs load them)
    Case(
        "model folder without tokenizer files",
        student_folder({"config.json": MODEL_CONFIG, "model.safetensors": WEIGHTS}),
        r"config key 'models.base_student.path': '.*student' has no loadable tokenizer \(tokenizer.json or "
        r"tokenizer.model, with tokenizer_config.json\)",
        snakemake=True,
    ),
    Case(
        "model folder of an architecture transformers does not know",
        student_folder(
            {"config.json": b'{"model_type": "llamma"}', "model.safetensors": WEIGHTS, **_tokenizer_files(None)}
        ),
        r"config key 'models.base_student.path': '.*student': model_type 'llamma' is not an architecture this "
        r"transformers knows \(custom code needs trust_remote_code: true, only for a model you trust\)$",
    ),
    Case(
        "teacher tokenizer without a chat template",
        local_model(
            "teacher",
            {"config.json": MODEL_CONFIG, "model.safetensors": WEIGHTS, **_tokenizer_files(None)},
            chat_template=None,
        ),
        r"config key 'models.base_teacher.path': the tokenizer of '.*teacher' has no chat template; set the "
        r"config's chat_template$",
    ),
    # Settings a later job would reject after hours
    Case(
        "top-k above the vocabulary",
        edit(nested("teacher_topk.k", 60000)),
        r"config key 'teacher_topk.k': 60000 is more than the teacher's vocabulary of 49152 tokens",
        snakemake=True,
    ),
    Case(
        "no held-out split",
        edit(nested("datasets.preference.test_split", None)),
        r"config key 'datasets.preference.test_split': null, but evaluation needs a held-out split",
        snakemake=True,
    ),
    Case(
        "evaluation split the generator does not write",
        edit(both(nested("datasets.generate.validation_rows", 0), nested("evaluation.split", "validation"))),
        r"config key 'evaluation.split': the generated dataset has no split 'validation' \(it has: test, train\)",
    ),
    Case(
        "student cut deeper than the teacher",
        edit(nested("models.base_student.teacher_layers", 2)),
        r"config key 'models.base_student.teacher_layers': 2 must select fewer than the teacher's 2 layers",
    ),
    Case(
        "student cut layer index beyond the teacher",
        edit(nested("models.base_student.teacher_layers", [0, 5])),
        r"config key 'models.base_student.teacher_layers': \[0, 5\] must select fewer than the teacher's 2 layers",
    ),
    Case(
        "random_init heads that do not divide",
        edit(nested("models.base_teacher.random_init.num_attention_heads", 5)),
        r"config key 'models.base_teacher.random_init.num_attention_heads': 5 heads do not divide hidden_size 64",
    ),
    Case(
        "GGUF package not installed",
        edit(nested("models.base_teacher.gguf.package", "no_such_model_package")),
        r"config key 'models.base_teacher.gguf': model package 'no_such_model_package' is not installed",
    ),
    Case(
        "a derived setting set",
        edit(nested("vanilla_kd.max_length", 64)),
        r"config key 'vanilla_kd.max_length': derived from dckd.max_length, not set \(got 64\): remove it",
    ),
    Case(
        "sweep of a teacher setting",
        edit(nested("sweeps.lr", {"setting": "ref_teacher.learning_rate", "values": [1.0e-3]})),
        r"config key 'sweeps.lr.setting': ref_teacher.learning_rate is not a student-side setting",
        snakemake=True,
    ),
    Case(
        "sweep value out of range",
        edit(nested("sweeps.lam", {"setting": "adpa.adpa_weight", "values": [-1]})),
        r"config key 'sweeps.lam.values\[0\]': -1: config key 'adpa.adpa_weight': -1 is less than the minimum of 0",
    ),
    # Round 4: every request honored or refused in one line before any job
    Case(
        "held-out rows beyond what the task families hold",
        edit(
            both(
                nested("datasets.generate.families", ["next_day", "next_letter"]),
                nested("datasets.generate.sft_error_rates", {}),
            )
        ),
        r"config key 'datasets.generate.validation_rows': 8 test and 8 validation rows asked, but the families next_day, "
        r"next_letter hold 32 distinct prompts and the training splits \(train_rows 32, twice\) use 23 of them: "
        r"9 left for the held-out splits; lower train_rows or the held-out rows, or add families$",
        snakemake=True,
    ),
    Case(
        "a split with no rows",
        preference_splits(train=[GOOD_PAIR], test=[]),
        r"dataset '.*pairs' split 'test' has no rows \(.*pairs/test.json\)$",
        key="datasets.preference.test_split",
    ),
    Case(
        "misspelled training split of a local folder",
        both_setups(preference_rows([GOOD_PAIR]), edit(nested("datasets.preference.train_split", "tarin"))),
        r"dataset '.*pairs': no split 'tarin' \(have: test, train\)$",
        key="datasets.preference.train_split",
    ),
    Case(
        "misspelled evaluation split of a local folder",
        both_setups(preference_rows([GOOD_PAIR]), edit(nested("evaluation.split", "tset"))),
        r"dataset '.*pairs': no split 'tset' \(have: test, train\)$",
        snakemake=True,
        key="evaluation.split",
    ),
    Case(
        "LoRA target module the teacher lacks",
        edit(nested("dpo_teacher.peft", {"target_modules": ["q_proj", "nonexistent_proj"]})),
        r"config key 'dpo_teacher.peft.target_modules': nonexistent_proj matches no module of the teacher \(llama; "
        r"its linear layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\)$",
        snakemake=True,
    ),
    Case(
        "QLoRA without a CUDA GPU",
        edit(nested("ref_teacher.peft", {"load_in_4bit": True})),
        r"config key 'ref_teacher.peft.load_in_4bit': QLoRA needs a CUDA GPU; this machine has none$",
    ),
    Case(
        "sweep setting without its section",
        edit(nested("sweeps.lam", {"setting": "adpa_weight", "values": [1.0]})),
        r"config key 'sweeps.lam.setting': 'adpa_weight' is not section.key; sections with 'adpa_weight': adpa "
        r"\(e.g. adpa.adpa_weight\)$",
        key="sweeps",
    ),
    Case(
        "student_sft.max_length below every prompt",
        edit(nested("student_sft.max_length", 12)),
        r"config key 'student_sft.max_length': 12 tokens leave no response token in any row of datasets.sft for "
        r"student_sft \(the shortest prompt has \d+ tokens\)$",
        snakemake=True,
    ),
    Case(
        "GPU accelerate config on a machine without GPUs",
        edit(nested("launch.accelerate_config", "config/accelerate/deepspeed_zero3.yaml")),
        r"config key 'launch.num_processes': 2 GPUs requested \(config/accelerate/deepspeed_zero3.yaml\), this "
        r"machine has 0$",
    ),
    Case(
        "tracker not installed",
        edit(nested("launch.report_to", ["trackio"])),
        r"config key 'launch.report_to': trackio is not installed",
    ),
    Case(
        "misspelled task family",
        edit(nested("datasets.generate.families", ["additon", "next_day"])),
        r"config key 'datasets.generate.families': unknown task family 'additon'; did you mean 'addition'\?$",
    ),
    Case(
        "misspelled family of an error rate",
        edit(nested("datasets.generate.sft_error_rates", {"upercase_word": 0.5})),
        r"config key 'datasets.generate.sft_error_rates': unknown task family 'upercase_word'; did you mean "
        r"'uppercase_word'\?$",
    ),
    Case(
        "chat template that does not compile",
        edit(nested("chat_template", "{% for m in messages %}{{ m.content }}")),
        r"config key 'chat_template': not a Jinja template: line 1: Unexpected end of template",
        snakemake=True,
    ),
    Case(
        "judge questions missing",
        edit(nested("evaluation.mt_bench", "/nonexistent/question.jsonl")),
        r"config key 'evaluation.mt_bench': no such file or directory: /nonexistent/question.jsonl",
    ),
]


def scratch_config(folder: Path, case: Case) -> Path:
    config = copy.deepcopy(TINY)
    text = case.setup(folder, config)
    path = folder / "config" / "case.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text if isinstance(text, str) else yaml.safe_dump(config, sort_keys=False))
    return path


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_check_gives_one_error_line(case, tmp_path, capsys):
    path = scratch_config(tmp_path, case)
    code = cli.main(["check", "--configfile", str(path)])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "Traceback" not in captured.err
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert re.search(case.error, lines[0].removeprefix("error: ")), lines[0]


def test_missing_gguf_package_is_named(tmp_path, capsys, monkeypatch):
    """transformers reads GGUF through the `gguf` package: its absence is an input error, not a traceback in base_teacher."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name == "gguf" else find_spec(name, *rest)
    )
    path = scratch_config(tmp_path, Case("no gguf", edit(lambda config: None), ""))
    assert cli.main(["check", "--configfile", str(path)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: config key 'models.base_teacher.gguf': reading GGUF files needs the 'gguf' package (pip install gguf; see README install)"
    ]


# Checks whose bad value cannot be staged on this machine in a config alone, and the test that trips each.
CHECKED_ELSEWHERE = {
    "work_dir": "tests/test_preflight.py::test_disk_estimate_counts_the_checkpoints_each_stage_writes",
    "models.base_student.path": "tests/test_preflight.py (check_vocabularies: a student of another vocabulary)",
}


def test_every_registered_check_has_a_bad_value_and_its_line():
    """The registry (adpa/workflow/checks.py) and this table agree: each check is tripped here by some case."""
    from adpa.workflow.checks import registered

    tripped = {case.checked_key for case in CASES}
    untested = [
        check.function.__name__
        for check in registered()
        if not any(key in tripped or key in CHECKED_ELSEWHERE for key in check.keys)
    ]
    assert not untested, f"checks without a bad-input case: {untested}"


def test_every_registered_key_is_declared_in_the_schema():
    from adpa.workflow.checks import registered
    from adpa.workflow.config import load_schema

    schema = load_schema()

    def declared(path: str) -> bool:
        node = schema
        for part in path.split("."):
            if "$ref" in node:
                node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
            properties = node.get("properties", {})
            if part not in properties:
                return False
            node = properties[part]
        return True

    undeclared = [key for check in registered() for key in check.keys if not declared(key)]
    assert not undeclared, undeclared


SNAKEMAKE_CASES = [case for case in CASES if case.snakemake]


@pytest.mark.workflow
@pytest.mark.parametrize("case", SNAKEMAKE_CASES, ids=[case.name for case in SNAKEMAKE_CASES])
def test_snakemake_stops_before_any_job(case, tmp_path):
    workdir = copy_workflow(tmp_path / "bad input project")
    path = scratch_config(workdir, case)
    result = run_snakemake(workdir, "--cores", "1", "--configfile", str(path.relative_to(workdir)), check=False)
    assert result.returncode != 0
    lines = error_lines(result.stdout + result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.search(case.error, lines[0].removeprefix("error: ")), lines[0]
    assert not (workdir / "results").exists() and not (workdir / "logs").exists(), "no job ran"
