# The student half: student_sft, the teacher signals (top-k store, own responses, advantage) and
# the aligned students dckd, adpa, adpa_plus, plus the student_dpo baseline. Every student stage
# runs once per seed of `seeds`, into results/seed<N>/; base_student and teacher_topk are shared.

STUDENTS = f"{RESULTS}/seed{{seed}}"


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
        threads: threads_of("base_student")
        resources:
            **resources_of("base_student"),
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
        directory(f"{STUDENTS}/student_sft"),
    params:
        stage=student_params("student_sft"),
        code=code_hash("student_sft"),
        model=base_student_reference,
        tokenizer=base_teacher_tokenizer,
        launch=train_command,
        options=train_options,
    log:
        "logs/seed{seed}/student_sft.log",
    benchmark:
        "benchmarks/seed{seed}/student_sft.tsv"
    threads: threads_of("student_sft")
    resources:
        **resources_of("student_sft"),
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
    threads: threads_of("teacher_topk")
    resources:
        **resources_of("teacher_topk"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.adpa} teacher_topk --params {params.stage:q} --model {input.model:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"


rule student_generations:
    input:
        model=f"{STUDENTS}/student_sft",
        data=dataset_input("preference"),
    output:
        directory(f"{STUDENTS}/student_generations"),
    params:
        stage=student_params("student_generations"),
        code=code_hash("student_generations"),
        adpa=adpa_command,
        options=inference_options,
    log:
        "logs/seed{seed}/student_generations.log",
    benchmark:
        "benchmarks/seed{seed}/student_generations.tsv"
    threads: threads_of("student_generations")
    resources:
        **resources_of("student_generations"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.adpa} student_generations --params {params.stage:q} --model {input.model:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule advantage:
    input:
        dpo_teacher=f"{RESULTS}/dpo_teacher",
        ref_teacher=f"{RESULTS}/ref_teacher",
        generations=f"{STUDENTS}/student_generations",
    output:
        directory(f"{STUDENTS}/advantage"),
    params:
        stage=student_params("advantage"),
        code=code_hash("advantage"),
        adpa=adpa_command,
        options=inference_options,
    log:
        "logs/seed{seed}/advantage.log",
    benchmark:
        "benchmarks/seed{seed}/advantage.tsv"
    threads: threads_of("advantage")
    resources:
        **resources_of("advantage"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.adpa} advantage --params {params.stage:q} --model {input.dpo_teacher:q}"
        " --ref-model {input.ref_teacher:q} --generations {input.generations:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"


rule dckd:
    input:
        model=f"{STUDENTS}/student_sft",
        topk=f"{RESULTS}/teacher_topk",
        data=dataset_input("preference"),
    output:
        directory(f"{STUDENTS}/dckd"),
    params:
        stage=student_params("dckd"),
        code=code_hash("dckd"),
        launch=train_command,
        options=train_options,
    log:
        "logs/seed{seed}/dckd.log",
    benchmark:
        "benchmarks/seed{seed}/dckd.tsv"
    threads: threads_of("dckd")
    resources:
        **resources_of("dckd"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} dckd --params {params.stage:q} --model {input.model:q} --topk {input.topk:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule adpa:
    input:
        model=f"{STUDENTS}/student_sft",
        generations=f"{STUDENTS}/student_generations",
        advantage=f"{STUDENTS}/advantage",
        data=dataset_input("preference"),
    output:
        directory(f"{STUDENTS}/adpa"),
    params:
        stage=student_params("adpa"),
        code=code_hash("adpa"),
        launch=train_command,
        options=train_options,
    log:
        "logs/seed{seed}/adpa.log",
    benchmark:
        "benchmarks/seed{seed}/adpa.tsv"
    threads: threads_of("adpa")
    resources:
        **resources_of("adpa"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} adpa --params {params.stage:q} --model {input.model:q}"
        " --generations {input.generations:q} --advantage {input.advantage:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule adpa_plus:
    input:
        model=f"{STUDENTS}/dckd",
        generations=f"{STUDENTS}/student_generations",
        advantage=f"{STUDENTS}/advantage",
        data=dataset_input("preference"),
    output:
        directory(f"{STUDENTS}/adpa_plus"),
    params:
        stage=student_params("adpa_plus"),
        code=code_hash("adpa_plus"),
        launch=train_command,
        options=train_options,
    log:
        "logs/seed{seed}/adpa_plus.log",
    benchmark:
        "benchmarks/seed{seed}/adpa_plus.tsv"
    threads: threads_of("adpa_plus")
    resources:
        **resources_of("adpa_plus"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} adpa_plus --params {params.stage:q} --model {input.model:q}"
        " --generations {input.generations:q} --advantage {input.advantage:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule student_dpo:
    input:
        model=f"{STUDENTS}/student_sft",
        data=dataset_input("preference"),
    output:
        directory(f"{STUDENTS}/student_dpo"),
    params:
        stage=student_params("student_dpo"),
        code=code_hash("student_dpo"),
        launch=train_command,
        options=train_options,
    log:
        "logs/seed{seed}/student_dpo.log",
    benchmark:
        "benchmarks/seed{seed}/student_dpo.tsv"
    threads: threads_of("student_dpo")
    resources:
        **resources_of("student_dpo"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} student_dpo --params {params.stage:q} --model {input.model:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"
