# Preparation for the embedded default: a GGUF-shipped base model and the generated task data.


rule base_teacher:
    output:
        directory(f"{RESULTS}/base_teacher"),
    params:
        stage=stage_params("base_teacher"),
        code=code_hash("base_teacher"),
        adpa=adpa_command,
    log:
        "logs/base_teacher.log",
    benchmark:
        "benchmarks/base_teacher.tsv"
    threads: threads_of("base_teacher")
    resources:
        **resources_of("base_teacher"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.adpa} base_teacher --params {params.stage:q} --output {output:q} > {log:q} 2>&1"


if config["datasets"]["generate"]:

    rule generate_data:
        output:
            sft=directory(f"{RESULTS}/data/sft"),
            preference=directory(f"{RESULTS}/data/preference"),
        params:
            stage=stage_params("generate_data"),
            code=code_hash("generate_data"),
            adpa=adpa_command,
        log:
            "logs/generate_data.log",
        benchmark:
            "benchmarks/generate_data.tsv"
        threads: threads_of("generate_data")
        resources:
            **resources_of("generate_data"),
        conda:
            "../envs/train.yaml"
        shell:
            "{params.adpa} generate_data --params {params.stage:q}"
            " --sft-output {output.sft:q} --preference-output {output.preference:q} > {log:q} 2>&1"
