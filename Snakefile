# adpa-workflow: ADPA (ICLR 2025) from a base LLM to aligned small students.
# Stages live in rules/*.smk; all logic lives in the `adpa` package (python -m adpa <stage>).
from snakemake.utils import min_version

min_version("9.0")


# A recipe given with --configfile is complete on its own: it replaces the default, not merges.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


wildcard_constraints:
    seed=r"\d+",


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/teachers.smk"
include: "rules/students.smk"
include: "rules/evaluation.smk"
include: "rules/sweeps.smk"


# What the config text cannot show (dataset rows, vocabularies, GPUs, disk): checked once,
# before the first job of a real run.
onstart:
    preflight(config)


# Every finished job is recorded now (also when another failed): the trained models kept in work
# folders for a republish after a kill can go.
onsuccess:
    clean_work(config)


onerror:
    clean_work(config)


# Everything: both teachers, the students of every seed, their evaluation, the table and plots,
# and each sweep's table and plot.
rule all:
    default_target: True
    input:
        rules.summary.output,
        SWEEP_TABLES,
