"""The conda env and pyproject.toml pin the same versions of the training stack."""

from __future__ import annotations

import re

import tomllib
import yaml
from conftest import REPO


def pins(requirements: list[str]) -> dict[str, str]:
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([\w.]+)", requirement.strip())
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_conda_env_pins_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "train.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    project_pins, env_pins = pins(project), pins(pip_section)
    assert project_pins, "pyproject.toml pins the training stack"
    for name, version in project_pins.items():
        if name == "snakemake":  # runs the workflow, not inside a rule's env
            continue
        assert env_pins.get(name) == version, f"envs/train.yaml pins {name}=={env_pins.get(name)}, pyproject {version}"
    assert env_pins["torch"] == "2.13.0"


def test_pins_are_the_versions_the_tests_run_with():
    """What the test suite runs on is what envs/train.yaml gives a conda user (torch: its CPU or CUDA build)."""
    from importlib.metadata import version

    env = yaml.safe_load((REPO / "envs" / "train.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    for name, pinned in pins(pip_section).items():
        installed = version(name)
        if name == "torch":
            installed = installed.split("+")[0]  # 2.13.0+cpu
        assert installed == pinned, f"envs/train.yaml pins {name}=={pinned}, the tests run {installed}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, pinned in pins(project["slurm"]).items():
        assert version(name) == pinned, (
            f"pyproject.toml's slurm extra pins {name}=={pinned}, the tests run {version(name)}"
        )


def test_every_test_tool_is_pinned_and_installed():
    """A floating test tool broke a fresh install's suite (pytest 9.2 refused nested approx): every tool
    of the `test` extra is pinned, and the suite runs the pinned version."""
    from importlib.metadata import version

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    pinned = pins(extra)
    assert len(pinned) == len(extra), f"unpinned test tools: {[item for item in extra if '==' not in item]}"
    for name, wanted in pinned.items():
        assert version(name) == wanted, (
            f"pyproject.toml's test extra pins {name}=={wanted}, the tests run {version(name)}"
        )
