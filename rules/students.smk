# The student half: student_sft, the teacher signals (top-k store, own responses, advantage) and
# the aligned students dckd, adpa, adpa_plus, plus the student_dpo baseline.


if "teacher_layers" in config["models"]["base_student"]:

    rule base_student:
        input:
            teacher=base_teacher_input(),
        output:
            directory(f"{RESULTS}/base_student"),
        params:
            stage=stage_params("base_student"),
            code=code_hash("base_student"),
            teacher=teacher_reference_for_student,
            adpa=adpa_command,
        log:
            "logs/base_student.log",
        benchmark:
            "benchmarks/base_student.tsv"
        conda:
            "../envs/train.yaml"
        shell:
            "{params.adpa} base_student --params {params.stage:q} --teacher {params.teacher:q}"
            " --output {output:q} > {log:q} 2>&1"


rule student_sft:
    input:
        model=base_student_input(),
        tokenizer=base_teacher_input(),
        data=dataset_input("sft"),
    output:
        directory(f"{RESULTS}/student_sft"),
    params:
        stage=stage_params("student_sft"),
        code=code_hash("student_sft"),
        model=base_student_reference,
        tokenizer=base_teacher_tokenizer,
        launch=train_command,
        options=train_options,
    log:
        "logs/student_sft.log",
    benchmark:
        "benchmarks/student_sft.tsv"
    threads: LAUNCH["threads"]
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} student_sft --params {params.stage:q} --model {params.model:q}"
        " --tokenizer {params.tokenizer:q} --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule teacher_topk:
    input:
        model=f"{RESULTS}/dpo_teacher",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/teacher_topk"),
    params:
        stage=stage_params("teacher_topk"),
        code=code_hash("teacher_topk"),
        adpa=adpa_command,
        options=inference_options,
    log:
        "logs/teacher_topk.log",
    benchmark:
        "benchmarks/teacher_topk.tsv"
    threads: LAUNCH["threads"]
    conda:
        "../envs/train.yaml"
    shell:
        "{params.adpa} teacher_topk --params {params.stage:q} --model {input.model:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"


rule student_generations:
    input:
        model=f"{RESULTS}/student_sft",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/student_generations"),
    params:
        stage=stage_params("student_generations"),
        code=code_hash("student_generations"),
        adpa=adpa_command,
        options=inference_options,
    log:
        "logs/student_generations.log",
    benchmark:
        "benchmarks/student_generations.tsv"
    threads: LAUNCH["threads"]
    conda:
        "../envs/train.yaml"
    shell:
        "{params.adpa} student_generations --params {params.stage:q} --model {input.model:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule advantage:
    input:
        dpo_teacher=f"{RESULTS}/dpo_teacher",
        ref_teacher=f"{RESULTS}/ref_teacher",
        generations=f"{RESULTS}/student_generations",
    output:
        directory(f"{RESULTS}/advantage"),
    params:
        stage=stage_params("advantage"),
        code=code_hash("advantage"),
        adpa=adpa_command,
        options=inference_options,
    log:
        "logs/advantage.log",
    benchmark:
        "benchmarks/advantage.tsv"
    threads: LAUNCH["threads"]
    conda:
        "../envs/train.yaml"
    shell:
        "{params.adpa} advantage --params {params.stage:q} --model {input.dpo_teacher:q}"
        " --ref-model {input.ref_teacher:q} --generations {input.generations:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"


rule dckd:
    input:
        model=f"{RESULTS}/student_sft",
        topk=f"{RESULTS}/teacher_topk",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/dckd"),
    params:
        stage=stage_params("dckd"),
        code=code_hash("dckd"),
        launch=train_command,
        options=train_options,
    log:
        "logs/dckd.log",
    benchmark:
        "benchmarks/dckd.tsv"
    threads: LAUNCH["threads"]
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} dckd --params {params.stage:q} --model {input.model:q} --topk {input.topk:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule adpa:
    input:
        model=f"{RESULTS}/student_sft",
        generations=f"{RESULTS}/student_generations",
        advantage=f"{RESULTS}/advantage",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/adpa"),
    params:
        stage=stage_params("adpa"),
        code=code_hash("adpa"),
        launch=train_command,
        options=train_options,
    log:
        "logs/adpa.log",
    benchmark:
        "benchmarks/adpa.tsv"
    threads: LAUNCH["threads"]
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} adpa --params {params.stage:q} --model {input.model:q}"
        " --generations {input.generations:q} --advantage {input.advantage:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule adpa_plus:
    input:
        model=f"{RESULTS}/dckd",
        generations=f"{RESULTS}/student_generations",
        advantage=f"{RESULTS}/advantage",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/adpa_plus"),
    params:
        stage=stage_params("adpa_plus"),
        code=code_hash("adpa_plus"),
        launch=train_command,
        options=train_options,
    log:
        "logs/adpa_plus.log",
    benchmark:
        "benchmarks/adpa_plus.tsv"
    threads: LAUNCH["threads"]
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} adpa_plus --params {params.stage:q} --model {input.model:q}"
        " --generations {input.generations:q} --advantage {input.advantage:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule student_dpo:
    input:
        model=f"{RESULTS}/student_sft",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/student_dpo"),
    params:
        stage=stage_params("student_dpo"),
        code=code_hash("student_dpo"),
        launch=train_command,
        options=train_options,
    log:
        "logs/student_dpo.log",
    benchmark:
        "benchmarks/student_dpo.tsv"
    threads: LAUNCH["threads"]
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} student_dpo --params {params.stage:q} --model {input.model:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"
