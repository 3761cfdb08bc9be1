# adpa-workflow: ADPA (ICLR 2025) from a base LLM to aligned small students.
# Stages live in rules/*.smk; all logic lives in the `adpa` package (python -m adpa <stage>).
from snakemake.utils import min_version

min_version("9.0")


# A recipe given with --configfile is complete on its own: it replaces the default, not merges.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/teachers.smk"
include: "rules/students.smk"


rule all:
    input:
        expand(
            "results/{model}",
            model=["dpo_teacher", "student_dpo", "dckd", "adpa", "adpa_plus"],
        ),
    default_target: True
