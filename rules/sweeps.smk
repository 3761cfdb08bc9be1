# Sweeps (config `sweeps`): the student stages a sweep retrains, once per value, under
# results/sweeps/<name>/<key>~<value>/ (their inputs the point's where it retrains them, else the main
# run's), their evaluation, and one table and plot per sweep. The method rules' twins are in students.smk.


use rule student_sft as student_sft_sweep with:
    input:
        model=configured_model("base_student"),
        tokenizer=configured_model("base_teacher"),
        data=dataset_input("sft"),
    output:
        directory(at_sweep_point(f"{STUDENTS}/student_sft")),
    log:
        at_sweep_point(log_of("student_sft")),
    benchmark:
        at_sweep_point(benchmark_of("student_sft"))
    wildcard_constraints:
        **SWEEP_WILDCARDS,


use rule teacher_topk as teacher_topk_sweep with:
    input:
        model=f"{RESULTS}/dpo_teacher",
        data=dataset_input("preference"),
    output:
        directory(at_sweep_point(f"{RESULTS}/teacher_topk")),
    log:
        at_sweep_point(log_of("teacher_topk")),
    benchmark:
        at_sweep_point(benchmark_of("teacher_topk"))
    wildcard_constraints:
        **SWEEP_WILDCARDS,


use rule teacher_generations as teacher_generations_sweep with:
    input:
        model=f"{RESULTS}/dpo_teacher",
        data=dataset_input("preference"),
    output:
        directory(at_sweep_point(f"{RESULTS}/teacher_generations")),
    log:
        at_sweep_point(log_of("teacher_generations")),
    benchmark:
        at_sweep_point(benchmark_of("teacher_generations"))
    wildcard_constraints:
        **SWEEP_WILDCARDS,


use rule student_generations as student_generations_sweep with:
    input:
        model=at_point("seed{seed}/student_sft"),
        data=dataset_input("preference"),
    output:
        directory(at_sweep_point(f"{STUDENTS}/student_generations")),
    log:
        at_sweep_point(log_of("student_generations")),
    benchmark:
        at_sweep_point(benchmark_of("student_generations"))
    wildcard_constraints:
        **SWEEP_WILDCARDS,


use rule advantage as advantage_sweep with:
    input:
        dpo_teacher=f"{RESULTS}/dpo_teacher",
        ref_teacher=reference_teacher,
        generations=at_point("seed{seed}/student_generations"),
    output:
        directory(at_sweep_point(f"{STUDENTS}/{{advantage}}")),
    log:
        at_sweep_point(log_of("advantage", "{advantage}")),
    benchmark:
        at_sweep_point(benchmark_of("advantage", "{advantage}"))
    wildcard_constraints:
        **SWEEP_WILDCARDS,
        advantage="|".join(ADVANTAGE_REFERENCE),


use rule chosen_advantage as chosen_advantage_sweep with:
    input:
        dpo_teacher=f"{RESULTS}/dpo_teacher",
        ref_teacher=f"{RESULTS}/ref_teacher",
        data=dataset_input("preference"),
    output:
        directory(at_sweep_point(f"{RESULTS}/chosen_advantage")),
    log:
        at_sweep_point(log_of("chosen_advantage")),
    benchmark:
        at_sweep_point(benchmark_of("chosen_advantage"))
    wildcard_constraints:
        **SWEEP_WILDCARDS,


use rule evaluate as evaluate_sweep with:
    input:
        model=lambda wildcards: [f"{RESULTS}/sweeps/{wildcards.sweep}/{wildcards.point}/{wildcards.model}"],
        data=dataset_input("preference"),
    output:
        directory(at_sweep_point(f"{RESULTS}/eval/{{model}}")),
    log:
        at_sweep_point("logs/eval/{model}.log"),
    benchmark:
        at_sweep_point("benchmarks/eval/{model}.tsv")
    wildcard_constraints:
        **SWEEP_WILDCARDS,
        model=rf"seed\d+/({'|'.join(METHODS)})",


rule sweep_summary:
    input:
        sweep_evaluations,
    output:
        csv=report(
            f"{RESULTS}/sweeps/{{sweep}}.csv", caption="report/sweep.rst", category="Sweeps", subcategory="{sweep}"
        ),
        markdown=f"{RESULTS}/sweeps/{{sweep}}.md",
        plot=report(
            f"{RESULTS}/sweeps/{{sweep}}.svg", caption="report/sweep.rst", category="Sweeps", subcategory="{sweep}"
        ),
    log:
        "logs/sweeps/{sweep}.log",
    wildcard_constraints:
        sweep=SWEEP_WILDCARDS["sweep"],
    conda:
        "../envs/train.yaml"
    threads: threads_of("sweep_summary")
    resources:
        **resources_of("sweep_summary"),
    params:
        stage=sweep_params,
        code=code_hash("sweep_summary"),
        results=lambda wildcards, output: Path(output.csv).parent.parent,
        adpa=adpa_command,
    shell:
        "{params.adpa} sweep_summary --params {params.stage:q} --results {params.results:q} --csv {output.csv:q}"
        " --markdown {output.markdown:q} --plot {output.plot:q} 2>&1 | tee {log:q}"


SWEEP_TABLES = expand(f"{RESULTS}/sweeps/{{sweep}}.{{suffix}}", sweep=SWEEPS, suffix=("csv", "md", "svg"))
