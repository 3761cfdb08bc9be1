# Config validation, path helpers and the launch commands; every other .smk only wires files.
import shlex
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from adpa import config as adpa_config
from adpa import launch
from adpa.errors import InputError
from adpa.judges import check_judge_inputs
from adpa.provenance import code_hash
from adpa.stages import METHODS, STAGES

try:
    adpa_config.check_config_files(workflow.configfiles)
    adpa_config.validate_config(config, adpa_config.load_schema(Path(workflow.basedir, "config/schema.yaml")))
    adpa_config.check_local_sources(config, workflow.basedir)
    check_judge_inputs(config)
except InputError as error:
    sys.exit(f"error: {error}")


def preflight(config):
    """Checks what the jobs about to run will read (a target that needs only the teachers never
    reads the student's model)."""
    from adpa.preflight import Plan, run_preflight

    jobs = [(job.rule.name, dict(job.wildcards_dict)) for job in workflow.dag.needrun_jobs()]
    try:
        run_preflight(config, workflow.basedir, local_jobs=workflow.local_exec, plan=Plan.of_jobs(jobs))
    except InputError as error:
        sys.exit(f"error: {error}")


RESULTS = "results"
LAUNCH = config["launch"]
ADPA = launch.adpa_command(workflow.basedir)
TRAIN = launch.training_command(config, workflow.basedir)


# Launch settings change no result. Params computed by a function of `threads` count as
# derived in Snakemake and are no rerun trigger, so changing them never reruns a stage.
def adpa_command(wildcards, threads):
    return ADPA


def train_command(wildcards, threads):
    return TRAIN


# Threads and scheduler requests (local --resources gpu=N, Slurm partition/memory/runtime/GPUs)
# of each rule, from the config's `resources` and `launch`.
def threads_of(rule):
    return launch.job_threads(config, rule)


def resources_of(rule):
    return launch.job_resources(config, workflow.basedir, rule)


def inference_options(wildcards, threads):
    return f"--batch-size {LAUNCH['inference_batch_size']} --threads {threads}"


def train_options(wildcards, threads):
    options = [
        f"--work-dir {shlex.quote(config['work_dir'])}",
        f"--save-steps {LAUNCH['save_steps']}",
        f"--save-total-limit {LAUNCH['save_total_limit']}",
        f"--logging-steps {LAUNCH['logging_steps']}",
        "--gradient-checkpointing" if LAUNCH["gradient_checkpointing"] else "--no-gradient-checkpointing",
        f"--threads {threads}",
    ]
    return " ".join(options)


def stage_fields(stage):
    """The params of every stage's rule, its settings (per seed for per-seed stages: a function of
    the wildcards, so a rerun trigger) and the hash of the code it runs."""
    if STAGES[stage].per_seed:

        def settings(wildcards):
            return adpa_config.params_json(adpa_config.stage_params(config, stage, int(wildcards.seed)))

    else:
        settings = adpa_config.params_json(adpa_config.stage_params(config, stage))
    return {"stage": settings, "code": code_hash(stage)}


def cli_inputs(stage):
    """A stage's input options, `--topk 'results/teacher_topk'`, from its registry entry (quoted)."""

    def options(wildcards, input):
        return " ".join(
            f"--{option.replace('_', '-')} {shlex.quote(getattr(input, option))}" for option in stage.inputs
        )

    return options


def log_of(stage):
    return f"logs/seed{{seed}}/{stage}.log" if STAGES[stage].per_seed else f"logs/{stage}.log"


def benchmark_of(stage):
    return f"benchmarks/seed{{seed}}/{stage}.tsv" if STAGES[stage].per_seed else f"benchmarks/{stage}.tsv"


def local_or_none(reference):
    """A source path Snakemake should track, or None for a hub id."""
    if adpa_config.is_local(reference):
        return adpa_config.expand_path(reference)
    return None


def configured_model(name):
    """The input files of a configured model (models.<name>): the workflow's own folder for a GGUF
    teacher or a student cut, the local folder for a path, nothing for a hub id."""
    spec = config["models"][name]
    if "path" not in spec:
        return [f"{RESULTS}/{name}"]
    local = local_or_none(spec["path"])
    return [local] if local else []


def model_or_path(name, key="model"):
    """The model as a stage sees it: its input folder when it has one, else the configured hub id."""

    def reference(wildcards, input):
        files = getattr(input, key)
        return files[0] if files else config["models"][name]["path"]

    return reference


def dataset_input(name):
    path = config["datasets"][name]["path"]
    if path in adpa_config.produced_paths(config):
        return [path]
    local = local_or_none(path)
    return [local] if local else []


# Evaluation: every model the results table holds, and where each comes from.
EVALUATED = adpa_config.evaluated_models(config)


def evaluated_model_input(wildcards):
    if wildcards.model == "base_teacher":
        return configured_model("base_teacher")
    return [f"{RESULTS}/{wildcards.model}"]


def run_name(wildcards, threads):
    return shlex.quote(config["run_name"])
