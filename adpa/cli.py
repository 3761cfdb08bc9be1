"""`python -m adpa <stage> ...`: every stage runs without Snakemake too.

Settings come either as `--params` (the exact JSON the Snakemake rule tracks) or from a
`--configfile`, reduced to the same per-stage parameters. The stages, their options and the
function each runs come from the registry (adpa/dag/stages.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import logging
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adpa.core import artifacts
from adpa.core.errors import InputError
from adpa.dag.stages import REGISTRY, STAGES, Stage, max_length_key
from adpa.report import model_card
from adpa.training import preemption
from adpa.workflow import config as configuration
from adpa.workflow.launch import SWITCHES


def _expanded_path(value: str) -> Path:
    """A path from the config reaches the CLI quoted, so the shell never expands its ~: expand it here."""
    return Path(configuration.expand_path(value))


# Each stage input: its argparse settings (the option is --<name with dashes>).
OPTIONS: dict[str, dict[str, Any]] = {
    "model": {"required": True, "help": "initial / inference model: hub id or local folder"},
    "output": {"required": True, "type": Path, "help": "output folder (appears complete at the end, or not at all)"},
    "tokenizer": {"required": True, "help": "the base teacher (its tokenizer and chat template)"},
    "teacher": {"required": True, "help": "base teacher: hub id or local folder"},
    "topk": {"required": True, "type": Path, "help": "the DPO teacher's top-k store (teacher_topk)"},
    "generations": {"required": True, "type": Path, "help": "greedy responses (student_ or teacher_generations)"},
    "advantage": {"required": True, "type": Path, "help": "the advantage store"},
    "ref_model": {"default": None, "help": "the REF teacher (advantage with reference: true)"},
    "batch_size": {"type": int, "default": 8},
    "name": {"required": True, "help": "the model's name in the results (its path under results/)"},
    "run_name": {"default": "adpa", "help": "prefix of the model id in AlpacaEval/MT-Bench answers"},
    "results": {"type": Path, "default": Path("results"), "help": "the results folder"},
    "csv": {"required": True, "type": Path},
    "markdown": {"required": True, "type": Path},
    "metrics_plot": {"required": True, "type": Path},
    "loss_plot": {"required": True, "type": Path},
    "paired_csv": {"type": Path, "help": "also write the paired differences (with intervals) here"},
    "plot": {"required": True, "type": Path},
    "sft_output": {"required": True, "type": Path},
    "preference_output": {"required": True, "type": Path},
}


def _switch(value: str) -> bool | str:
    if value not in ("auto", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return value if value == "auto" else value == "true"


def _launch_defaults() -> dict[str, Any]:
    """The launch settings' defaults (and the trackers), from the schema: the one place they are written."""
    launch = configuration.load_schema()["properties"]["launch"]["properties"]
    defaults = {
        key: launch[key]["default"]
        for key in (
            "save_steps",
            "save_total_limit",
            "logging_steps",
            "gradient_checkpointing",
            "report_to",
            *SWITCHES,
        )
    }
    defaults["loss_chunk_tokens"] = launch["loss_chunk_tokens"]["default"]
    return {**defaults, "trackers": launch["report_to"]["items"]["enum"]}


def _stage_parser(sub, stage: Stage, launch_defaults: Mapping[str, Any]) -> None:
    parser = sub.add_parser(stage.name, help=stage.help, description=stage.help)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="stage parameters as canonical JSON (what the workflow passes)")
    source.add_argument(
        "--configfile", type=Path, nargs="+", help="workflow config files instead of --params (later overlay earlier)"
    )
    if stage.per_seed:
        parser.add_argument(
            "--seed", type=int, help="with --configfile: the student seed (default: the first of `seeds`)"
        )
    if stage.name == "sweep_summary":
        parser.add_argument("--sweep", help="with --configfile: the sweep's name (default: the only one)")
    for name in stage.options:
        parser.add_argument(
            f"--{name.replace('_', '-')}", **(OPTIONS[name] if name in OPTIONS else _input_option(stage, name))
        )
    if stage.kind == "training":
        parser.add_argument(
            "--work-dir",
            type=_expanded_path,
            default=Path("work"),
            help="resumable checkpoints go here (~ is expanded)",
        )
        for name in ("save_steps", "save_total_limit", "logging_steps"):
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=launch_defaults[name])
        parser.add_argument(
            "--gradient-checkpointing",
            action=argparse.BooleanOptionalAction,
            default=launch_defaults["gradient_checkpointing"],
        )
        parser.add_argument(
            "--report-to",
            nargs="*",
            choices=launch_defaults["trackers"],
            default=launch_defaults["report_to"],
            help="experiment trackers (none: nothing after the flag)",
        )
        parser.add_argument("--run-name", default="adpa", help="the config's run_name: groups the trackers' runs")
        for name in SWITCHES:
            parser.add_argument(
                f"--{name.replace('_', '-')}",
                type=_switch,
                default=launch_defaults[name],
                help="auto (on GPUs), true or false",
            )
        parser.add_argument("--loss-chunk-tokens", type=int, default=launch_defaults["loss_chunk_tokens"])
        parser.add_argument("--attention", default="auto", help="attn_implementation, or auto")
    if stage.kind != "cpu":
        parser.add_argument(
            "--threads", type=int, default=None, help="CPU threads of the whole job, split between processes"
        )


def _input_option(stage: Stage, name: str) -> dict[str, Any]:
    """A student method's input that OPTIONS does not describe (adpa/dag/methods.py names it): a results folder."""
    if name not in stage.inputs:
        raise KeyError(f"stage {stage.name}: option {name!r} is neither in OPTIONS nor one of its inputs")
    return {"required": True, "help": f"results/{stage.inputs[name]}"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adpa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    launch_defaults = _launch_defaults()
    for stage in REGISTRY:
        _stage_parser(sub, stage, launch_defaults)
    check = sub.add_parser("check", help="validate config files and print the derived launch settings")
    check.add_argument("--configfile", type=Path, nargs="+", required=True, help="later files overlay earlier ones")
    check.add_argument("--slurm", action="store_true", help="jobs run through Slurm: skip this machine's GPU count")
    sub.add_parser("free-port", help="print a free TCP port (for accelerate's rendezvous)")
    engine = sub.add_parser(
        "engine", help="print the accelerate config file a training job runs with (launch.accelerate_config: auto)"
    )
    engine.add_argument(
        "--launch", required=True, help="the launch settings as JSON (adpa.workflow.launch.engine_settings)"
    )
    engine.add_argument("stage_arguments", nargs=argparse.REMAINDER, help="the stage and its arguments")
    sub.add_parser("config-docs", help="print config/README.md, generated from config/schema.yaml")
    return parser


def _params(args: argparse.Namespace) -> tuple[dict, str]:
    if args.configfile is not None:
        loaded = configuration.load_config(args.configfile)
        if args.command == "sweep_summary":
            params = configuration.sweep_summary_params(loaded, args.sweep)
        else:
            # The advantage without --ref-model is adpa_no_ref's: the DPO teacher's log-probs alone.
            reference = {"advantage_reference": args.ref_model is not None} if args.command == "advantage" else {}
            params = configuration.stage_params(loaded, args.command, getattr(args, "seed", None), **reference)
    else:
        params = json.loads(args.params)
    return params, configuration.params_json(params)


def _runner(stage: Stage) -> Callable[..., Any]:
    """The stage's function, imported with the cyclic GC paused: importing the stack under it
    (torch, transformers, TRL: ~500k long-lived objects) triggered ~1400 collections that rescanned
    them as they arrived, 1 s of every job's start. Frozen afterwards, they are never scanned again:
    not by later collections, and not at exit (`python -m adpa` freezes what it made since)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return getattr(importlib.import_module(stage.module), stage.function)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _set_threads(threads: int | None) -> None:
    """Split the job's cores between the local processes: oversubscribed CPU training runs 2x slower."""
    if threads:
        import torch

        torch.set_num_threads(max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _outputs(stage: Stage) -> list[str]:
    return [name for name in stage.options if name.endswith("output")]


def _republished(run) -> bool:
    """A model this job already trained and exported, killed before Snakemake recorded it: rank 0 (the
    one that publishes) publishes it again; every rank then skips training."""
    if os.environ.get("RANK", "0") != "0":
        return (run.work_dir / artifacts.EXPORTED / artifacts.MANIFEST).is_file()
    if not artifacts.republish(run.work_dir, run.output):
        return False
    logging.getLogger("adpa").warning(
        "%s: republished %s from %s (trained before; Snakemake had not recorded it)",
        run.stage,
        run.output,
        run.work_dir / artifacts.EXPORTED,
    )
    return True


def run_stage(args: argparse.Namespace) -> None:
    """Training stages train and publish themselves. Other stages with output folders fill staging
    folders, published with their manifests once the stage returns; summary writes its files itself."""
    from adpa.workflow.provenance import code_hash

    stage = STAGES[args.command]
    if stage.kind == "training":
        preemption.install()  # before the models load: a signal while loading stops at the first step
    params, params_json = _params(args)
    _set_threads(getattr(args, "threads", None))
    runner = _runner(stage)
    if stage.kind == "training":
        from adpa.training.train import mark_imports_done

        mark_imports_done()
    outputs = {name: getattr(args, name) for name in _outputs(stage)}
    inputs = {name: getattr(args, name) for name in stage.options if name not in outputs}
    parents = model_card.lineage(inputs)
    if stage.kind == "training":
        from adpa.training.train import LaunchOptions, StageRun

        run = StageRun(
            stage=stage.name,
            params=params,
            params_json=params_json,
            code=code_hash(stage.name),
            output=outputs["output"],
            work_root=args.work_dir,
            launch=LaunchOptions(
                gradient_checkpointing=args.gradient_checkpointing,
                save_steps=args.save_steps,
                save_total_limit=args.save_total_limit,
                logging_steps=args.logging_steps,
                report_to=tuple(args.report_to),
                run_name=args.run_name,
                **_resolved_switches(args),
            ),
            max_length_key=max_length_key(stage.name) or "max_length",
            parents=parents,
            before_publish=functools.partial(model_card.write_card, shown_as=outputs["output"]),
        )
        if _republished(run):
            return
        runner(run, **inputs)
    elif outputs:
        staged = {name: artifacts.fresh_staging_dir(path) for name, path in outputs.items()}
        try:
            metrics = runner(params, **staged, **inputs)
            code = code_hash(stage.name)
            for name, path in outputs.items():
                artifacts.write_manifest(
                    staged[name], stage.name, params, params_json, code, metrics, {"parents": parents}
                )
                if (staged[name] / "config.json").is_file():  # a model folder (base_teacher, base_student)
                    model_card.write_card(staged[name], shown_as=path)
                artifacts.publish(staged[name], path)
        except (OSError, RuntimeError) as error:
            _raise_if_disk_full(stage.name, next(iter(outputs.values())), list(staged.values()), error)
            raise
        if stage.name == "evaluate":
            # The evaluated model's card gains its held-out metrics (a card is no stage's rerun key),
            # if this run published it: a base teacher given by path is an input, never written.
            published = model_card.published_beside(outputs["output"], inputs["name"])
            model_card.add_evaluation(str(inputs["model"]), metrics, params, published)
        # The stage's metrics end its log, as the training stages' do.
        logging.getLogger("adpa").warning(
            "%s: wrote %s  %s", stage.name, " ".join(map(str, outputs.values())), json.dumps(metrics)
        )
    else:
        runner(params, **inputs)


def _resolved_switches(args: argparse.Namespace) -> dict[str, Any]:
    """The speed switches for this machine: auto is on where a GPU trains (liger: where installed)."""
    import torch

    from adpa.workflow import engine

    on_gpu = torch.cuda.is_available()
    attention = engine.attention(args.attention, on_gpu)
    return {
        "attention": attention,
        "padding_free": engine.switch(args.padding_free, on_gpu, attention in engine.VARLEN_ATTENTION),
        "liger_kernel": engine.switch(args.liger_kernel, on_gpu, engine.liger_available()),
        "precompute_ref_log_probs": engine.switch(args.precompute_ref_log_probs, on_gpu),
        "loss_chunk_tokens": args.loss_chunk_tokens,
    }


def _engine(settings_json: str, stage_arguments: list[str], workflow_dir: Path) -> str:
    """The accelerate file of a job (`launch.accelerate_config: auto`), chosen from its stage, settings
    and model; the choice and its estimate go to stderr, the job's log."""
    from adpa.workflow import engine

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("stage")
    parser.add_argument("--params")
    parser.add_argument("--configfile", nargs="+")
    parser.add_argument("--model", default="")
    parser.add_argument("--dpo-teacher", default="")  # dpkd's reference, gkd's online teacher: held frozen
    known, _ = parser.parse_known_args(stage_arguments)
    if known.params is not None:
        params = json.loads(known.params)
    elif known.configfile:
        params = configuration.stage_params(configuration.load_config(known.configfile), known.stage)
    else:
        params = {}
    settings = json.loads(settings_json)
    choice = engine.choose_for_job(settings, known.stage, params, known.model, frozen_models=(known.dpo_teacher,))
    print(f"{known.stage}: engine {choice.engine} ({choice.accelerate_file}): {choice.reason}", file=sys.stderr)
    if choice.engine == "plain" and settings["num_processes"] * settings["num_machines"] == 1:
        return engine.DIRECT
    return str(Path(workflow_dir, choice.accelerate_file))


def _raise_if_disk_full(stage: str, output: Path, staged: list[Path], error: BaseException) -> None:
    """A stage that does not train and ran out of space: one line naming its output, and its staging
    folders go."""
    from adpa.training.train import disk_full

    full = disk_full(stage, Path(output), None, error)
    if full is None:
        return
    for folder in staged:
        shutil.rmtree(folder, ignore_errors=True)
    raise full from error


def _print_launch(config: Mapping[str, Any], workflow_dir: Path) -> None:
    """How each training stage is distributed, and what every job asks of the scheduler."""
    from adpa.workflow import launch

    machines, processes = config["launch"]["num_machines"], config["launch"]["num_processes"]
    for stage in configuration.TRAINING_STAGES:
        training = config[STAGES[stage].section]
        steps = configuration.gradient_accumulation_steps(config, stage)
        print(
            f"{stage}: gradient_accumulation_steps = {steps}  (effective batch {training['effective_batch_size']} = "
            f"{training['per_device_batch_size']} per device x {processes} processes x {machines} machines x {steps})"
        )
    from adpa.workflow import engine

    sizes = engine.estimated_parameters(config)
    memory = config["launch"]["gpu_memory_gb"] or engine.gpu_memory_gb()
    for stage in configuration.TRAINING_STAGES:
        size = sizes["teacher" if stage in engine.TEACHER_STAGES else "student"]
        # dpkd's reference and gkd's online teacher: the DPO teacher, held frozen beside the student.
        frozen = (sizes["teacher"] or 0) if "dpo_teacher" in STAGES[stage].inputs else 0
        print(engine.describe(config, stage, size, memory, other_frozen=frozen))
    for stage in REGISTRY:
        print(
            f"{stage.name}: threads={launch.job_threads(config, stage.name)} "
            f"{launch.job_resources(config, workflow_dir, stage.name)}"
        )


def _check(configfiles: list[Path], slurm: bool) -> None:
    from adpa.workflow.checks import check_files
    from adpa.workflow.preflight import run_preflight

    loaded = configuration.load_config(configfiles)
    workflow_dir = Path(__file__).resolve().parent.parent
    check_files(loaded, workflow_dir)
    run_preflight(loaded, workflow_dir, local_jobs=not slurm)
    _print_launch(loaded, workflow_dir)
    print(f"{' '.join(map(str, configfiles))}: ok")


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
        elif args.command == "engine":
            print(_engine(args.launch, args.stage_arguments, Path(__file__).resolve().parent.parent))
        elif args.command == "config-docs":
            from adpa.workflow.config_docs import render

            print(render(), end="")
        elif args.command == "check":
            _check(args.configfile, args.slurm)
        else:
            run_stage(args)
    except preemption.Preempted as stopped:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; the first one says so
            logging.getLogger("adpa").warning("%s", stopped)
        return stopped.exit_code
    except (InputError, FileExistsError) as err:
        # One line naming the key, file or row; no traceback for input errors.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
