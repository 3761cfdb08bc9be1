# Config validation, path helpers and the launch commands; every other .smk only wires files.
import shlex
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)

from adpa.workflow import config as adpa_config
from adpa.workflow import launch
from adpa.workflow.checks import check_files
from adpa.core.errors import InputError
from adpa.workflow.provenance import code_hash
from adpa.dag.stages import ADVANTAGE_REFERENCE, METHODS, STAGES
from adpa.dag.sweeps import producer

try:
    adpa_config.check_config_files(workflow.configfiles)
    adpa_config.validate_config(config, adpa_config.load_schema(Path(workflow.basedir, "config/schema.yaml")))
    check_files(config, workflow.basedir)
except InputError as error:
    sys.exit(f"error: {error}")


def preflight(config):
    """Checks what the jobs about to run will read (a target that needs only the teachers never
    reads the student's model)."""
    from adpa.workflow.preflight import Plan, run_preflight

    jobs = [(job.rule.name, dict(job.wildcards_dict)) for job in workflow.dag.needrun_jobs()]
    try:
        run_preflight(config, workflow.basedir, local_jobs=workflow.local_exec, plan=Plan.of_jobs(jobs))
    except InputError as error:
        sys.exit(f"error: {error}")


def clean_work(config):
    """Work folders of published models (kept until Snakemake has recorded their jobs)."""
    from adpa.core.artifacts import clean_work as remove_published
    from adpa.core.paths import expand_path

    remove_published(RESULTS, expand_path(config["work_dir"]))


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
        "--report-to " + " ".join(LAUNCH["report_to"]),
        f"--run-name {shlex.quote(config['run_name'])}",
        "--gradient-checkpointing" if LAUNCH["gradient_checkpointing"] else "--no-gradient-checkpointing",
        f"--threads {threads}",
        f"--loss-chunk-tokens {LAUNCH['loss_chunk_tokens']}",
        f"--attention {LAUNCH['attention']}",
    ]
    options += [f"--{name.replace('_', '-')} {str(LAUNCH[name]).lower()}" for name in launch.SWITCHES]
    return " ".join(options)


# Sweeps (config `sweeps`, adpa/dag/sweeps.py): a point's outputs live under results/sweeps/<name>/<key>~<value>/,
# its config is the main one with the swept setting at the point's value.
SWEEPS = adpa_config.plan_sweeps(config)
SWEEP_POINT = "sweeps/{sweep}/{point}"
POINT_CONFIGS = {(name, folder): point for name, sweep in SWEEPS.items() for folder, point in sweep.configs.items()}


SWEEP_WILDCARDS = {"sweep": "|".join(SWEEPS) or "no-sweep", "point": "[^/]+"}


def config_at(wildcards):
    """The config a job runs with: its sweep point's, or the main one."""
    sweep = getattr(wildcards, "sweep", None)
    return POINT_CONFIGS[(sweep, wildcards.point)] if sweep is not None else config


def stage_fields(stage):
    """The params of every stage's rule: its settings (a function of the wildcards, so a rerun trigger
    per seed, sweep point and advantage store) and the hash of the code it runs."""

    def settings(wildcards):
        seed = int(wildcards.seed) if STAGES[stage].per_seed else None
        options = {"advantage_reference": ADVANTAGE_REFERENCE[wildcards.advantage]} if stage == "advantage" else {}
        return adpa_config.params_json(adpa_config.stage_params(config_at(wildcards), stage, seed, **options))

    return {"stage": settings, "code": code_hash(stage)}


def at_point(path):
    """A results/ input of a job at a sweep point: the point's own output when the sweep retrains the
    stage that writes it, else the main run's."""

    def resolve(wildcards):
        retrained = producer(path) in SWEEPS[wildcards.sweep].retrained
        folder = f"{RESULTS}/sweeps/{wildcards.sweep}/{wildcards.point}" if retrained else RESULTS
        return f"{folder}/{path}".replace("{seed}", getattr(wildcards, "seed", "{seed}"))

    return resolve


def cli_inputs(stage):
    """A stage's input options, `--topk 'results/teacher_topk'`, from its registry entry (quoted)."""

    def options(wildcards, input):
        return " ".join(
            f"--{option.replace('_', '-')} {shlex.quote(getattr(input, option))}" for option in stage.inputs
        )

    return options


def reference_teacher(wildcards):
    """The advantage store subtracts the REF teacher's log-probs, or (advantage_no_ref) does without them."""
    return [f"{RESULTS}/ref_teacher"] if ADVANTAGE_REFERENCE[wildcards.advantage] else []


def reference_option(wildcards, input):
    return f"--ref-model {shlex.quote(input.ref_teacher[0])}" if input.ref_teacher else ""


def log_of(stage, folder=None):
    """logs/[<sweep point>/][seed<N>/]<folder>.log; folder: the output's name (default: the stage's)."""
    return f"logs/{STAGES[stage].per_seed * 'seed{seed}/'}{folder or stage}.log"


def benchmark_of(stage, folder=None):
    return f"benchmarks/{STAGES[stage].per_seed * 'seed{seed}/'}{folder or stage}.tsv"


def at_sweep_point(path):
    """logs/x.log -> logs/sweeps/{sweep}/{point}/x.log (the same for benchmarks/ and results/)."""
    root, rest = path.split("/", 1)
    return f"{root}/{SWEEP_POINT}/{rest}"


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


def sweep_evaluations(wildcards):
    """Every point's evaluation of the sweep's methods per seed (the config's value: the main run's),
    and student_sft's per seed (the win rate's opponent)."""
    sweep = SWEEPS[wildcards.sweep]
    seeds = adpa_config.student_seeds(config)
    points = [f"{RESULTS}/{point.folder}" if point.folder else RESULTS for point in sweep.points]
    models = [f"seed{seed}/{model}" for seed in seeds for model in sweep.methods]
    return [
        *(f"{point}/eval/{model}" for point in points for model in models),
        *(f"{RESULTS}/eval/seed{seed}/student_sft" for seed in seeds),
    ]


def sweep_params(wildcards):
    return adpa_config.params_json(adpa_config.sweep_table_params(config, SWEEPS[wildcards.sweep]))
