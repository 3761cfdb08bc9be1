# Config validation, path helpers and the launch commands; every other .smk only wires files.
import shlex
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from adpa import config as adpa_config
from adpa import launch
from adpa.judges import check_judge_inputs
from adpa.provenance import code_hash

try:
    adpa_config.check_config_files(workflow.configfiles)
    adpa_config.validate_config(config, adpa_config.load_schema(Path(workflow.basedir, "config/schema.yaml")))
    adpa_config.check_local_sources(config, workflow.basedir)
    check_judge_inputs(config)
except adpa_config.InputError as error:
    sys.exit(f"error: {error}")



def preflight(config):
    """Checks what the jobs about to run will read (a target that needs only the teachers never
    reads the student's model)."""
    from adpa.preflight import Plan, run_preflight

    jobs = [(job.rule.name, dict(job.wildcards_dict)) for job in workflow.dag.needrun_jobs()]
    try:
        run_preflight(config, workflow.basedir, local_jobs=workflow.local_exec, plan=Plan.of_jobs(jobs))
    except adpa_config.InputError as error:
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


def stage_params(stage):
    return adpa_config.params_json(adpa_config.stage_params(config, stage))


def student_params(stage):
    """The stage's settings for the seed in the output path (a function of wildcards: a rerun trigger)."""

    def params(wildcards):
        return adpa_config.params_json(adpa_config.stage_params(config, stage, int(wildcards.seed)))

    return params


def local_or_none(reference):
    """A source path Snakemake should track, or None for a hub id."""
    if adpa_config.is_local(reference):
        return adpa_config.expand_path(reference)
    return None


def base_teacher_reference(wildcards, input):
    """The base teacher as the training stage sees it: its input folder, else the hub id."""
    return input.model[0] if input.model else config["models"]["base_teacher"]["path"]


def base_teacher_input():
    if "gguf" in config["models"]["base_teacher"]:
        return [f"{RESULTS}/base_teacher"]
    local = local_or_none(config["models"]["base_teacher"]["path"])
    return [local] if local else []


def base_student_input():
    spec = config["models"]["base_student"]
    if "path" not in spec:
        return [f"{RESULTS}/base_student"]
    local = local_or_none(spec["path"])
    return [local] if local else []


def base_student_reference(wildcards, input):
    return input.model[0] if input.model else config["models"]["base_student"]["path"]


def base_teacher_tokenizer(wildcards, input):
    return input.tokenizer[0] if input.tokenizer else config["models"]["base_teacher"]["path"]


def teacher_reference_for_student(wildcards, input):
    return input.teacher[0] if input.teacher else config["models"]["base_teacher"]["path"]


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
        return base_teacher_input()
    return [f"{RESULTS}/{wildcards.model}"]


def evaluated_model_reference(wildcards, input):
    return input.model[0] if input.model else config["models"]["base_teacher"]["path"]


def run_name(wildcards, threads):
    return shlex.quote(config["run_name"])
