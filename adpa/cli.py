"""`python -m adpa <stage> ...`: every stage runs without Snakemake too.

Settings come either as `--params` (the exact JSON the Snakemake rule tracks) or from a
`--configfile`, reduced to the same per-stage parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import warnings
from pathlib import Path

from adpa import artifacts, config as configuration
from adpa.config import InputError

STAGES = ("base_teacher", "generate_data", "ref_teacher", "dpo_teacher")


def _stage_parser(sub, stage: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(stage, help=help_text)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="stage parameters as canonical JSON (what the workflow passes)")
    source.add_argument("--configfile", type=Path, help="a workflow config file instead of --params")
    return parser


def _training_parser(sub, stage: str, help_text: str) -> None:
    parser = _stage_parser(sub, stage, help_text)
    parser.add_argument("--model", required=True, help="initial model: hub id or local folder")
    parser.add_argument("--output", required=True, type=Path, help="final model folder (created at the end)")
    parser.add_argument("--work-dir", type=Path, default=Path("work"), help="resumable checkpoints go here")
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--save-total-limit", type=int, default=2)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the whole job, split between processes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adpa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    base = _stage_parser(sub, "base_teacher", "materialize a GGUF-shipped base model as safetensors")
    base.add_argument("--output", required=True, type=Path)
    data = _stage_parser(sub, "generate_data", "write the generated task family in both dataset forms")
    data.add_argument("--sft-output", required=True, type=Path)
    data.add_argument("--preference-output", required=True, type=Path)
    _training_parser(sub, "ref_teacher", "SFT of the base teacher (TRL SFTTrainer)")
    _training_parser(sub, "dpo_teacher", "DPO of the REF teacher (TRL DPOTrainer)")
    check = sub.add_parser("check", help="validate a config file and print the derived settings")
    check.add_argument("--configfile", type=Path, required=True)
    sub.add_parser("free-port", help="print a free TCP port (for accelerate's rendezvous)")
    return parser


def _params(args: argparse.Namespace) -> tuple[dict, str]:
    if args.configfile is not None:
        loaded = configuration.load_config(args.configfile)
        params = configuration.stage_params(loaded, args.command)
    else:
        params = json.loads(args.params)
    return params, configuration.params_json(params)


def _publish_dataset_dirs(params: dict, params_json: str, sft_output: Path, preference_output: Path) -> None:
    from adpa.data import generate_datasets
    from adpa.provenance import code_hash

    staged = [artifacts.fresh_staging_dir(out) for out in (sft_output, preference_output)]
    generate_datasets(params["generate"], staged[0], staged[1])
    for staging, output in zip(staged, (sft_output, preference_output)):
        artifacts.write_manifest(staging, "generate_data", params, params_json, code_hash("generate_data"), {})
        artifacts.publish(staging, output)


def _materialize(params: dict, params_json: str, output: Path) -> None:
    from adpa.models import materialize_base_model
    from adpa.provenance import code_hash

    staging = artifacts.fresh_staging_dir(output)
    metrics = materialize_base_model(params["model"], params["chat_template"], staging)
    artifacts.write_manifest(staging, "base_teacher", params, params_json, code_hash("base_teacher"), metrics)
    artifacts.publish(staging, output)


def _train(args: argparse.Namespace, params: dict, params_json: str) -> None:
    from adpa.train import LaunchOptions, StageRun, set_cpu_threads

    if args.threads:
        set_cpu_threads(args.threads)

    run = StageRun(
        stage=args.command,
        params=params,
        params_json=params_json,
        output=args.output,
        work_root=args.work_dir,
        launch=LaunchOptions(
            gradient_checkpointing=args.gradient_checkpointing,
            save_steps=args.save_steps,
            save_total_limit=args.save_total_limit,
            logging_steps=args.logging_steps,
        ),
    )
    if args.command == "ref_teacher":
        from adpa.sft import run_sft

        run_sft(run, args.model)
    else:
        from adpa.dpo import run_dpo

        run_dpo(run, args.model)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library deprecation notices, repeated per step and rank, would bury the progress bars.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "free-port":
            print(free_port())
        elif args.command == "check":
            loaded = configuration.load_config(args.configfile)
            for stage in configuration.TRAINING_STAGES:
                steps = configuration.gradient_accumulation_steps(loaded, stage)
                print(f"{stage}: gradient_accumulation_steps = {steps}")
            print(f"{args.configfile}: ok")
        elif args.command == "base_teacher":
            _materialize(*_params(args), args.output)
        elif args.command == "generate_data":
            _publish_dataset_dirs(*_params(args), args.sft_output, args.preference_output)
        else:
            _train(args, *_params(args))
    except (InputError, FileExistsError) as err:
        # One line naming the key, file or row; no traceback for input errors.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
