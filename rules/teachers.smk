# The teacher half: base teacher --SFT--> ref_teacher --DPO--> dpo_teacher, each via accelerate launch.


rule ref_teacher:
    input:
        model=base_teacher_input(),
        data=dataset_input("sft"),
    output:
        directory(f"{RESULTS}/ref_teacher"),
    params:
        stage=stage_params("ref_teacher"),
        model=base_teacher_reference,
        code=code_hash("ref_teacher"),
        launch=train_command,
        options=train_options,
    log:
        "logs/ref_teacher.log",
    benchmark:
        "benchmarks/ref_teacher.tsv"
    threads: threads_of("ref_teacher")
    resources:
        **resources_of("ref_teacher"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} ref_teacher --params {params.stage:q} --model {params.model:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"


rule dpo_teacher:
    input:
        model=f"{RESULTS}/ref_teacher",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/dpo_teacher"),
    params:
        stage=stage_params("dpo_teacher"),
        code=code_hash("dpo_teacher"),
        launch=train_command,
        options=train_options,
    log:
        "logs/dpo_teacher.log",
    benchmark:
        "benchmarks/dpo_teacher.tsv"
    threads: threads_of("dpo_teacher")
    resources:
        **resources_of("dpo_teacher"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} dpo_teacher --params {params.stage:q} --model {input.model:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"
