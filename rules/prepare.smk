# Preparation for the embedded default: a GGUF-shipped base model and the generated task data.


rule base_teacher:
    output:
        directory(f"{RESULTS}/base_teacher"),
    log:
        log_of("base_teacher"),
    benchmark:
        benchmark_of("base_teacher")
    conda:
        "../envs/train.yaml"
    threads: threads_of("base_teacher")
    resources:
        **resources_of("base_teacher"),
    params:
        **stage_fields("base_teacher"),
        adpa=adpa_command,
    shell:
        "{params.adpa} base_teacher --params {params.stage:q} --output {output:q} > {log:q} 2>&1"


if config["datasets"]["generate"]:

    rule generate_data:
        output:
            sft=directory(f"{RESULTS}/data/sft"),
            preference=directory(f"{RESULTS}/data/preference"),
        log:
            log_of("generate_data"),
        benchmark:
            benchmark_of("generate_data")
        conda:
            "../envs/train.yaml"
        threads: threads_of("generate_data")
        resources:
            **resources_of("generate_data"),
        params:
            **stage_fields("generate_data"),
            adpa=adpa_command,
        shell:
            "{params.adpa} generate_data --params {params.stage:q}"
            " --sft-output {output.sft:q} --preference-output {output.preference:q} > {log:q} 2>&1"
