"""Every command the docs print runs, in a scratch copy of the workflow, so none can rot.

The `snakemake ...` and `python -m adpa ...` commands of README.md, config/README.md and
docs/**/*.md (code blocks and inline code, with or without leading `VAR=value` assignments) and
of the YAML comments in config/ and profiles/ are each one test case, whose id is the command.
Each runs through `bash -o pipefail` (pipes as printed) in a copy of the files git knows:

- snakemake commands that start no job (`-n`, `--dag`, `--rulegraph`, `--unlock`, `--report`) run
  as printed; `--report` packs the table and plots of docs/results, copied back to results/;
- every other snakemake command needs GPUs, a cluster, hub models or hours of training, so it
  runs as a dry run: `-n` right after `snakemake`, the rest as printed. That parses the workflow
  and validates the config; a dry run does not execute the onstart preflight;
- `python -m adpa check ...` runs as printed; where this machine lacks what a recipe needs (GPUs,
  hub models in the cache: the hub is offline here) the error naming that is its expected end;
- `python -m adpa <stage> ...` has its command line parsed by the CLI's parser and its stage
  parameters read from the config; the stage itself does not run;
- other `python -m adpa` commands (`config-docs`, `--help`) run as printed.

HOME is a folder with the paper recipes' local files (`paper_home`). A synopsis runs with
`config/tiny.yaml` for FILE and without `[OVERLAY…]` or a trailing `…`. README.md's
`<!-- install -->` and `<!-- test -->` blocks are skipped (CI, .ci/run, executes them); its
`<!-- main-job -->` block runs here as a dry run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, paper_home

pytestmark = pytest.mark.workflow

CI_BLOCKS = ("install", "test")
ENV_ASSIGNMENTS = r"^(?:[A-Za-z_]\w*=\S*\s+)*"  # CUDA_VISIBLE_DEVICES=0,1 ...
COMMAND = re.compile(ENV_ASSIGNMENTS + r"(?:snakemake|python -m adpa)(?=\s|$)")
MARKER = re.compile(r"^<!-- ([\w-]+) -->$")
# Modes that start no job: they run as printed.
NO_JOBS = re.compile(
    r"\s(?:-n|--dry-run|--dryrun|--dag|--rulegraph|--filegraph|--unlock|--report|--lint|-h|--help)(?=\s|$)"
)
ADPA_AS_PRINTED = ("check", "config-docs", "free-port")
# Errors that name what this machine lacks, not a fault of the command.
MACHINE_LIMITS = (
    re.compile(r"^error: config key 'launch\.num_processes': \d+ GPUs requested .*this machine has \d+$"),
    re.compile(r"^error: config key 'models\.\w+\.path': hub id .* is not in the local cache and the hub is offline"),
)
PARSE_STAGE = """
import sys
from adpa import cli
from adpa.workflow import config
args = cli.build_parser().parse_args(sys.argv[1:])
if args.configfile is not None:
    config.stage_params(config.load_config(args.configfile), args.command, getattr(args, "seed", None))
"""


@dataclass(frozen=True)
class Command:
    text: str  # as printed: continuations joined, a trailing `# comment` dropped
    path: str
    line: int

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` after a space, outside quotes)."""
    for match in re.finditer(r"\s#", line):
        before = line[: match.start()]
        if before.count("'") % 2 == 0 and before.count('"') % 2 == 0:
            return before.rstrip()
    return line.rstrip()


def _block_commands(lines: list[tuple[int, str]], name: str) -> list[Command]:
    commands, pending, start = [], "", 0
    for number, line in lines:
        if not pending:
            start = number
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        text = _strip_comment(pending)
        if COMMAND.match(text):
            commands.append(Command(text, name, start))
        pending = ""
    return commands


def markdown_commands(path: Path, name: str) -> list[Command]:
    """The commands of one Markdown file's code blocks and inline code, in order."""
    commands: list[Command] = []
    prose: list[str] = []  # the text outside code blocks, blank lines in their place
    block: list[tuple[int, str]] | None = None
    marker, skip = None, False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if block is None:
                block, skip = [], marker in CI_BLOCKS
            else:
                if not skip:
                    commands += _block_commands(block, name)
                block = None
            marker = None
            prose.append("")
            continue
        if block is not None:
            block.append((number, line))
            prose.append("")
            continue
        found = MARKER.match(line.strip())
        marker = found.group(1) if found else (marker if not line.strip() else None)
        prose.append(line)
    text = "\n".join(prose)
    for span in re.finditer(r"`([^`]+)`", text):
        command = " ".join(span.group(1).split())
        if COMMAND.match(command):
            commands.append(Command(command, name, text.count("\n", 0, span.start()) + 1))
    return sorted(commands, key=lambda command: command.line)


def yaml_comment_commands(path: Path, name: str) -> list[Command]:
    """The commands a YAML file's `#` comment lines show (usage lines of profiles and overlays)."""
    commands = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = _strip_comment(line.lstrip("#").strip()) if line.startswith("#") else ""
        if COMMAND.match(text):
            commands.append(Command(text, name, number))
    return commands


def documented_commands(root: Path) -> list[Command]:
    """Every documented command once, in the order of its first appearance."""
    found: list[Command] = []
    for path in [root / "README.md", root / "config" / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        if path.is_file():
            found += markdown_commands(path, str(path.relative_to(root)))
    for path in sorted([*(root / "config").rglob("*.yaml"), *(root / "profiles").rglob("*.yaml")]):
        found += yaml_comment_commands(path, str(path.relative_to(root)))
    unique: dict[str, Command] = {}
    for command in found:
        unique.setdefault(command.text, command)
    return list(unique.values())


def concrete(text: str) -> str:
    """A synopsis made runnable: FILE is the tiny config; `[OVERLAY…]` and a trailing `…` go."""
    text = re.sub(r"\bFILE\b", "config/tiny.yaml", text.replace("[OVERLAY…]", ""))
    return " ".join(text.replace("…", "").split())


def as_run(text: str) -> str:
    """The shell line a documented command runs as (see the module docstring)."""
    text = concrete(text)
    prefix_end = COMMAND.match(text).end()
    head, tail = text[:prefix_end], text[prefix_end:]
    if head.endswith("snakemake"):
        first = tail.split("|", 1)[0]
        return text if NO_JOBS.search(first) else f"{head} -n{tail}"
    words = tail.split()
    if not words or words[0] in ADPA_AS_PRINTED or words[0].startswith("-"):
        return text
    return f"{head.removesuffix('-m adpa')}-c {shlex.quote(PARSE_STAGE)}{tail}"


def missing_programs(text: str) -> list[str]:
    """Programs a command needs that this machine lacks (graphviz's `dot`, conda for --sdm conda)."""
    stages = [re.sub(ENV_ASSIGNMENTS, "", part.strip()).split() for part in text.split("|")[1:]]
    programs = [words[0] for words in stages if words]
    if "--sdm conda" in text:
        programs.append("conda")
    return [program for program in programs if shutil.which(program) is None]


def run_documented(text: str, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", as_run(text)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ends_at_machine_limit(result: subprocess.CompletedProcess) -> bool:
    lines = result.stderr.strip().splitlines()
    return result.returncode == 2 and bool(lines) and any(limit.match(lines[-1]) for limit in MACHINE_LIMITS)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the files git knows (in a folder whose name holds a space), and the commands' environment."""
    root = tmp_path_factory.mktemp("docs commands")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    workdir = root / "workflow copy"
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, workdir / name)
    # The report's inputs: the embedded run's table and plots, back where the workflow writes them.
    (workdir / "results" / "plots").mkdir(parents=True, exist_ok=True)
    for path in (workdir / "docs" / "results").iterdir():
        if path.is_dir():  # results/ablations: another run's tables
            continue
        shutil.copy2(path, workdir / "results" / ("plots" if path.suffix == ".svg" else "") / path.name)
    # `python` in a command is this interpreter (a script, not a link, so a virtualenv stays active).
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {
        **os.environ,
        "HOME": str(paper_home(root / "home")),
        "HF_HOME": os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")),
        "HF_HUB_OFFLINE": "1",
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return workdir, env


COMMANDS = documented_commands(REPO)


def test_the_guides_commands_are_found():
    texts = [command.text for command in COMMANDS]
    assert "snakemake --cores 2" in texts  # the main-job block
    assert any(text.startswith("CUDA_VISIBLE_DEVICES=0,1 snakemake --profile profiles/local-2gpu") for text in texts)
    assert any(text.startswith("python -m adpa check --configfile config/") for text in texts)


@pytest.mark.parametrize("command", COMMANDS, ids=[command.text for command in COMMANDS])
def test_documented_command_runs(scratch, command):
    workdir, env = scratch
    missing = missing_programs(command.text)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    result = run_documented(command.text, workdir, env)
    assert result.returncode == 0 or ends_at_machine_limit(result), (
        f"{command.source}: `{command.text}` (run as `{as_run(command.text)}`) failed:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def test_a_target_after_configfile_is_flagged(scratch, tmp_path):
    """A scratch README with the seed guide's command as it once was: found, run, and failing."""
    workdir, env = scratch
    original = (REPO / "README.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(
        original + "\nInline: `snakemake --cores 1 results/ref_teacher`.\n\n"
        "<!-- test -->\n```bash\nsnakemake --help\n```\n\n"
        "```bash\n# the teachers\nCUDA_VISIBLE_DEVICES=0,1 snakemake --profile profiles/local-2gpu \\\n"
        "  --configfile config/mistral-7b-deita.yaml results/dpo_teacher   # broken\n```\n"
    )
    lines = original.count("\n")
    added = [command for command in markdown_commands(readme, "README.md") if command.line > lines]
    assert [(command.text, command.source) for command in added] == [
        ("snakemake --cores 1 results/ref_teacher", f"README.md:{lines + 2}"),
        (
            "CUDA_VISIBLE_DEVICES=0,1 snakemake --profile profiles/local-2gpu --configfile config/mistral-7b-deita.yaml "
            "results/dpo_teacher",
            f"README.md:{lines + 11}",
        ),
    ]
    result = run_documented(added[1].text, workdir, env)
    assert result.returncode != 0 and not ends_at_machine_limit(result)
    assert "No such file or directory: 'results/dpo_teacher'" in result.stdout + result.stderr  # read as a config file
