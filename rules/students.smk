# The student half: student_sft, the teacher signals (top-k store, greedy responses, advantage)
# and the student methods (adpa/dag/stages.py: ADPA, ADPA+, DCKD and the baselines). Every student
# stage runs once per seed of `seeds`, into results/seed<N>/; the teacher signals are shared.

STUDENTS = f"{RESULTS}/seed{{seed}}"


if "teacher_layers" in config["models"]["base_student"]:

    rule base_student:
        input:
            teacher=configured_model("base_teacher"),
        output:
            directory(f"{RESULTS}/base_student"),
        log:
            log_of("base_student"),
        benchmark:
            benchmark_of("base_student")
        conda:
            "../envs/train.yaml"
        threads: threads_of("base_student")
        resources:
            **resources_of("base_student"),
        params:
            **stage_fields("base_student"),
            teacher=model_or_path("base_teacher", key="teacher"),
            adpa=adpa_command,
        shell:
            "{params.adpa} base_student --params {params.stage:q} --teacher {params.teacher:q}"
            " --output {output:q} > {log:q} 2>&1"


rule student_sft:
    input:
        model=configured_model("base_student"),
        tokenizer=configured_model("base_teacher"),
        data=dataset_input("sft"),
    output:
        directory(f"{STUDENTS}/student_sft"),
    log:
        log_of("student_sft"),
    benchmark:
        benchmark_of("student_sft")
    conda:
        "../envs/train.yaml"
    threads: threads_of("student_sft")
    resources:
        **resources_of("student_sft"),
    params:
        **stage_fields("student_sft"),
        model=model_or_path("base_student"),
        tokenizer=model_or_path("base_teacher", key="tokenizer"),
        launch=train_command,
        options=train_options,
    shell:
        "{params.launch} student_sft --params {params.stage:q} --model {params.model:q}"
        " --tokenizer {params.tokenizer:q} --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule teacher_topk:
    input:
        model=f"{RESULTS}/dpo_teacher",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/teacher_topk"),
    log:
        log_of("teacher_topk"),
    benchmark:
        benchmark_of("teacher_topk")
    conda:
        "../envs/train.yaml"
    threads: threads_of("teacher_topk")
    resources:
        **resources_of("teacher_topk"),
    params:
        **stage_fields("teacher_topk"),
        adpa=adpa_command,
        options=inference_options,
    shell:
        "{params.adpa} teacher_topk --params {params.stage:q} --model {input.model:q} --output {output:q}"
        " {params.options} 2>&1 | tee {log:q}"


rule teacher_generations:
    input:
        model=f"{RESULTS}/dpo_teacher",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/teacher_generations"),
    log:
        log_of("teacher_generations"),
    benchmark:
        benchmark_of("teacher_generations")
    conda:
        "../envs/train.yaml"
    threads: threads_of("teacher_generations")
    resources:
        **resources_of("teacher_generations"),
    params:
        **stage_fields("teacher_generations"),
        adpa=adpa_command,
        options=inference_options,
    shell:
        "{params.adpa} teacher_generations --params {params.stage:q} --model {input.model:q}"
        " --output {output:q} {params.options} 2>&1 | tee {log:q}"


use rule teacher_generations as student_generations with:
    input:
        model=f"{STUDENTS}/student_sft",
        data=dataset_input("preference"),
    output:
        directory(f"{STUDENTS}/student_generations"),
    log:
        log_of("student_generations"),
    benchmark:
        benchmark_of("student_generations")
    threads: threads_of("student_generations")
    resources:
        **resources_of("student_generations"),
    params:
        **stage_fields("student_generations"),
        adpa=adpa_command,
        options=inference_options,


rule advantage:
    input:
        dpo_teacher=f"{RESULTS}/dpo_teacher",
        ref_teacher=reference_teacher,
        generations=f"{STUDENTS}/student_generations",
    output:
        directory(f"{STUDENTS}/{{advantage}}"),
    log:
        log_of("advantage", "{advantage}"),
    benchmark:
        benchmark_of("advantage", "{advantage}")
    wildcard_constraints:
        advantage="|".join(ADVANTAGE_REFERENCE),
    conda:
        "../envs/train.yaml"
    threads: threads_of("advantage")
    resources:
        **resources_of("advantage"),
    params:
        **stage_fields("advantage"),
        reference=reference_option,
        adpa=adpa_command,
        options=inference_options,
    shell:
        "{params.adpa} advantage --params {params.stage:q} --model {input.dpo_teacher:q} {params.reference}"
        " --generations {input.generations:q} --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule chosen_advantage:
    input:
        dpo_teacher=f"{RESULTS}/dpo_teacher",
        ref_teacher=f"{RESULTS}/ref_teacher",
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/chosen_advantage"),
    log:
        log_of("chosen_advantage"),
    benchmark:
        benchmark_of("chosen_advantage")
    conda:
        "../envs/train.yaml"
    threads: threads_of("chosen_advantage")
    resources:
        **resources_of("chosen_advantage"),
    params:
        **stage_fields("chosen_advantage"),
        adpa=adpa_command,
        options=inference_options,
    shell:
        "{params.adpa} chosen_advantage --params {params.stage:q} --model {input.dpo_teacher:q}"
        " --ref-model {input.ref_teacher:q} --output {output:q} {params.options} 2>&1 | tee {log:q}"


# One rule per student method, from its registry entry: the inputs it names (results/ folders),
# the preference data when it reads it, and its CLI options in the same order. Each has a twin
# for sweep points (rules/sweeps.smk), whose inputs are the point's where the sweep retrains them.
for method in (STAGES[name] for name in METHODS):
    for at_sweep in (False, True):

        rule:
            name:
                f"{method.name}_sweep" if at_sweep else method.name
            input:
                **{
                    option: at_point(path) if at_sweep else f"{RESULTS}/{path}"
                    for option, path in method.inputs.items()
                },
                data=dataset_input("preference") if "preference_data" in method.reads else [],
            output:
                directory(at_sweep_point(f"{STUDENTS}/{method.name}") if at_sweep else f"{STUDENTS}/{method.name}"),
            log:
                at_sweep_point(log_of(method.name)) if at_sweep else log_of(method.name),
            benchmark:
                at_sweep_point(benchmark_of(method.name)) if at_sweep else benchmark_of(method.name)
            wildcard_constraints:
                **(SWEEP_WILDCARDS if at_sweep else {}),
            conda:
                "../envs/train.yaml"
            threads: threads_of(method.name)
            resources:
                **resources_of(method.name),
            params:
                **stage_fields(method.name),
                method=method.name,
                inputs=cli_inputs(method),
                launch=train_command,
                options=train_options,
            shell:
                "{params.launch} {params.method} --params {params.stage:q} {params.inputs}"
                " --output {output:q} {params.options} 2>&1 | tee {log:q}"
