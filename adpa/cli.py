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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adpa import artifacts, config as configuration
from adpa.config import InputError

TRAINING = ("ref_teacher", "dpo_teacher", "student_sft", "student_dpo", "dckd", "adpa", "adpa_plus")
INFERENCE = ("teacher_topk", "student_generations", "advantage")
# Extra inputs of each stage beyond --model and --output.
INPUTS: dict[str, tuple[str, ...]] = {
    "student_sft": ("--tokenizer",),
    "dckd": ("--topk",),
    "adpa": ("--generations", "--advantage"),
    "adpa_plus": ("--generations", "--advantage"),
    "advantage": ("--ref-model", "--generations"),
}
HELP = {
    "base_teacher": "materialize a GGUF-shipped base model as safetensors",
    "base_student": "cut a student from the base teacher's first layers",
    "generate_data": "write the generated task family in both dataset forms",
    "ref_teacher": "SFT of the base teacher (TRL SFTTrainer)",
    "dpo_teacher": "DPO of the REF teacher, reference = REF teacher (TRL DPOTrainer)",
    "student_sft": "SFT of the base student with the teacher's tokenizer",
    "student_dpo": "baseline DPO of the student, reference = student_sft",
    "teacher_topk": "the DPO teacher's top-k log-probs on chosen and rejected",
    "student_generations": "the student's greedy responses to the preference prompts",
    "advantage": "DPO-vs-REF teacher advantage on the student's own responses",
    "dckd": "distillation from the teacher's top-k on chosen and rejected",
    "adpa": "ADPA from student_sft",
    "adpa_plus": "ADPA from the DCKD student",
    "evaluate": "held-out accuracy, preference accuracy and margin of one model (and judge inputs)",
    "summary": "the results table (CSV, Markdown) and plots over every evaluated model",
}


def _expanded_path(value: str) -> Path:
    """A path from the config reaches the CLI quoted, so the shell never expands its ~: expand it here."""
    return Path(configuration.expand_path(value))


def _stage_parser(sub, stage: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(stage, help=HELP[stage])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="stage parameters as canonical JSON (what the workflow passes)")
    source.add_argument("--configfile", type=Path, help="a workflow config file instead of --params")
    if stage in configuration.STUDENT_STAGES:
        parser.add_argument("--seed", type=int, help="with --configfile: the student seed (default: the first of `seeds`)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adpa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_parser(sub, "base_teacher").add_argument("--output", required=True, type=Path)
    student = _stage_parser(sub, "base_student")
    student.add_argument("--teacher", required=True, help="base teacher: hub id or local folder")
    student.add_argument("--output", required=True, type=Path)
    data = _stage_parser(sub, "generate_data")
    data.add_argument("--sft-output", required=True, type=Path)
    data.add_argument("--preference-output", required=True, type=Path)
    for stage in TRAINING + INFERENCE:
        parser_ = _stage_parser(sub, stage)
        parser_.add_argument("--model", required=True, help="initial / inference model: hub id or local folder")
        parser_.add_argument("--output", required=True, type=Path, help="output folder (created at the end)")
        for option in INPUTS.get(stage, ()):
            parser_.add_argument(option, required=True)
        if stage in INFERENCE:
            parser_.add_argument("--batch-size", type=int, default=8)
        else:
            parser_.add_argument("--work-dir", type=_expanded_path, default=Path("work"),
                                 help="resumable checkpoints go here (~ is expanded)")
            parser_.add_argument("--save-steps", type=int, default=50)
            parser_.add_argument("--save-total-limit", type=int, default=2)
            parser_.add_argument("--logging-steps", type=int, default=1)
            parser_.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
        parser_.add_argument("--threads", type=int, default=None, help="CPU threads of the whole job, split between processes")
    evaluate = _stage_parser(sub, "evaluate")
    evaluate.add_argument("--model", required=True, help="the model: hub id or local folder")
    evaluate.add_argument("--name", required=True, help="its name in the results (its path under results/)")
    evaluate.add_argument("--run-name", default="adpa", help="prefix of the model id in AlpacaEval/MT-Bench answers")
    evaluate.add_argument("--output", required=True, type=Path)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--threads", type=int, default=None)
    summary = _stage_parser(sub, "summary")
    summary.add_argument("--results", type=Path, default=Path("results"), help="the results folder")
    summary.add_argument("--csv", required=True, type=Path)
    summary.add_argument("--markdown", required=True, type=Path)
    summary.add_argument("--metrics-plot", required=True, type=Path)
    summary.add_argument("--loss-plot", required=True, type=Path)
    summary.add_argument("--paired-csv", type=Path, help="also write the paired differences (with intervals) here")
    check = sub.add_parser("check", help="validate config files and print the derived launch settings")
    check.add_argument("--configfile", type=Path, nargs="+", required=True, help="later files overlay earlier ones")
    check.add_argument("--slurm", action="store_true", help="jobs run through Slurm: skip this machine's GPU count")
    sub.add_parser("free-port", help="print a free TCP port (for accelerate's rendezvous)")
    sub.add_parser("config-docs", help="print config/README.md, generated from config/schema.yaml")
    return parser


def _params(args: argparse.Namespace) -> tuple[dict, str]:
    if args.configfile is not None:
        loaded = configuration.load_config(args.configfile)
        params = configuration.stage_params(loaded, args.command, getattr(args, "seed", None))
    else:
        params = json.loads(args.params)
    return params, configuration.params_json(params)


def _publish(stage: str, params: dict, params_json: str, output: Path, produce) -> None:
    """Run `produce(staging) -> metrics` and move the finished folder into place with its manifest."""
    from adpa.provenance import code_hash

    staging = artifacts.fresh_staging_dir(output)
    metrics = produce(staging)
    artifacts.write_manifest(staging, stage, params, params_json, code_hash(stage), metrics)
    artifacts.publish(staging, output)
    # The stage's metrics end its log, as the training stages' do.
    logging.getLogger("adpa").warning("%s: wrote %s  %s", stage, output, json.dumps(metrics))


def _generate_data(params: dict, params_json: str, sft_output: Path, preference_output: Path) -> None:
    from adpa.data import generate_datasets
    from adpa.provenance import code_hash

    staged = [artifacts.fresh_staging_dir(out) for out in (sft_output, preference_output)]
    generate_datasets(params["generate"], staged[0], staged[1])
    for staging, output in zip(staged, (sft_output, preference_output)):
        artifacts.write_manifest(staging, "generate_data", params, params_json, code_hash("generate_data"), {})
        artifacts.publish(staging, output)


def _train(args: argparse.Namespace, params: dict, params_json: str) -> None:
    from adpa.train import LaunchOptions, StageRun

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
    if args.command in ("ref_teacher", "student_sft"):
        from adpa.sft import run_sft

        run_sft(run, args.model, getattr(args, "tokenizer", None))
    elif args.command in ("dpo_teacher", "student_dpo"):
        from adpa.dpo import run_dpo

        run_dpo(run, args.model)
    else:
        from adpa.distill import run_distillation

        run_distillation(
            run,
            args.model,
            topk_dir=Path(args.topk) if getattr(args, "topk", None) else None,
            generations_dir=Path(args.generations) if getattr(args, "generations", None) else None,
            advantage_dir=Path(args.advantage) if getattr(args, "advantage", None) else None,
        )


def _infer(args: argparse.Namespace, params: dict, params_json: str) -> None:
    from adpa import inference

    def produce(staging: Path) -> dict:
        if args.command == "teacher_topk":
            return inference.run_teacher_topk(params, args.model, staging, args.batch_size)
        if args.command == "student_generations":
            return inference.run_student_generations(params, args.model, staging, args.batch_size)
        return inference.run_advantage(params, args.model, args.ref_model, Path(args.generations), staging, args.batch_size)

    _publish(args.command, params, params_json, args.output, produce)


def _set_threads(threads: int | None) -> None:
    if threads:
        from adpa.train import set_cpu_threads

        set_cpu_threads(threads)


def _print_launch(config: Mapping[str, Any], workflow_dir: Path) -> None:
    """How each training stage is distributed, and what every job asks of the scheduler."""
    from adpa import launch

    machines, processes = config["launch"]["num_machines"], config["launch"]["num_processes"]
    for stage in configuration.TRAINING_STAGES:
        training = config[stage]
        steps = configuration.gradient_accumulation_steps(config, stage)
        print(
            f"{stage}: gradient_accumulation_steps = {steps}  (effective batch {training['effective_batch_size']} = "
            f"{training['per_device_batch_size']} per device x {processes} processes x {machines} machines x {steps})"
        )
    for rule in (*launch.CPU_RULES, *launch.TRAINING_RULES, *launch.INFERENCE_RULES):
        print(f"{rule}: threads={launch.job_threads(config, rule)} {launch.job_resources(config, workflow_dir, rule)}")


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
        elif args.command == "config-docs":
            from adpa.config_docs import render

            print(render(), end="")
        elif args.command == "check":
            from adpa.judges import check_judge_inputs
            from adpa.preflight import run_preflight

            loaded = configuration.load_config(args.configfile)
            workflow_dir = Path(__file__).resolve().parent.parent
            configuration.check_local_sources(loaded, workflow_dir)
            check_judge_inputs(loaded)
            run_preflight(loaded, workflow_dir, local_jobs=not args.slurm)
            _print_launch(loaded, workflow_dir)
            print(f"{' '.join(map(str, args.configfile))}: ok")
        elif args.command == "generate_data":
            _generate_data(*_params(args), args.sft_output, args.preference_output)
        elif args.command == "base_teacher":
            from adpa.models import materialize_base_model

            params, params_json = _params(args)
            _publish("base_teacher", params, params_json, args.output,
                     lambda staging: materialize_base_model(params["model"], params["chat_template"], staging))
        elif args.command == "base_student":
            from adpa.models import cut_student_from_teacher

            params, params_json = _params(args)
            _publish("base_student", params, params_json, args.output, lambda staging: cut_student_from_teacher(
                args.teacher, params["model"]["teacher_layers"], staging, params["teacher"]["trust_remote_code"],
                params["teacher"].get("revision")))
        elif args.command == "evaluate":
            from adpa.evaluate import run_evaluate

            _set_threads(args.threads)
            params, params_json = _params(args)
            _publish("evaluate", params, params_json, args.output, lambda staging: run_evaluate(
                params, args.model, args.name, args.run_name, staging, args.batch_size))
        elif args.command == "summary":
            from adpa.summary import write_summary

            params, _ = _params(args)
            table = write_summary(args.results, params["models"], params["run_name"], params["seed"], params["seeds"],
                                  args.csv, args.markdown, args.metrics_plot, args.loss_plot, args.paired_csv)
            print(table, end="")
        else:
            if args.threads:
                from adpa.train import set_cpu_threads

                set_cpu_threads(args.threads)
            if args.command in INFERENCE:
                _infer(args, *_params(args))
            else:
                _train(args, *_params(args))
    except (InputError, FileExistsError) as err:
        # One line naming the key, file or row; no traceback for input errors.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
