# The teacher half: base teacher --SFT--> ref_teacher --DPO--> dpo_teacher, each via accelerate launch.


rule ref_teacher:
    input:
        model=configured_model("base_teacher"),
        data=dataset_input("sft"),
    output:
        directory(f"{RESULTS}/ref_teacher"),
    log:
        log_of("ref_teacher"),
    benchmark:
        benchmark_of("ref_teacher")
    conda:
        "../envs/train.yaml"
    threads: threads_of("ref_teacher")
    resources:
        **resources_of("ref_teacher"),
    params:
        **stage_fields("ref_teacher"),
        model=model_or_path("base_teacher"),
        launch=train_command,
        options=train_options,
    shell:
        "{params.launch} ref_teacher --params {params.stage:q} --model {params.model:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"


rule dpo_teacher:
    input:
        model=f"{RESULTS}/ref_teacher",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/dpo_teacher"),
    log:
        log_of("dpo_teacher"),
    benchmark:
        benchmark_of("dpo_teacher")
    conda:
        "../envs/train.yaml"
    threads: threads_of("dpo_teacher")
    resources:
        **resources_of("dpo_teacher"),
    params:
        **stage_fields("dpo_teacher"),
        launch=train_command,
        options=train_options,
    shell:
        "{params.launch} dpo_teacher --params {params.stage:q} --model {input.model:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"
