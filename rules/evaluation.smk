# Evaluation of every model on the held-out split, and the results table, plots and report.


rule evaluate:
    input:
        model=evaluated_model_input,
        data=dataset_input("preference"),
    output:
        directory(f"{RESULTS}/eval/{{model}}"),
    log:
        "logs/eval/{model}.log",
    benchmark:
        "benchmarks/eval/{model}.tsv"
    wildcard_constraints:
        model="|".join(EVALUATED),
    conda:
        "../envs/train.yaml"
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    params:
        **stage_fields("evaluate"),
        model=model_or_path("base_teacher"),
        run_name=run_name,
        adpa=adpa_command,
        options=inference_options,
    shell:
        "{params.adpa} evaluate --params {params.stage:q} --model {params.model:q} --name {wildcards.model:q}"
        " --run-name {params.run_name} --output {output:q} {params.options} 2>&1 | tee {log:q}"


rule summary:
    input:
        evaluations=expand(f"{RESULTS}/eval/{{model}}", model=EVALUATED),
        models=[f"{RESULTS}/{model}" for model in EVALUATED if model != "base_teacher"],
    output:
        csv=report(f"{RESULTS}/summary.csv", caption="report/summary.rst", category="Results"),
        markdown=f"{RESULTS}/summary.md",
        paired=report(f"{RESULTS}/summary_paired.csv", caption="report/summary_paired.rst", category="Results"),
        metrics=report(f"{RESULTS}/plots/metrics.svg", caption="report/metrics.rst", category="Results"),
        losses=report(f"{RESULTS}/plots/training_loss.svg", caption="report/training_loss.rst", category="Training"),
    log:
        log_of("summary"),
    conda:
        "../envs/train.yaml"
    threads: threads_of("summary")
    resources:
        **resources_of("summary"),
    params:
        **stage_fields("summary"),
        results=lambda wildcards, output: Path(output.csv).parent,
        adpa=adpa_command,
    shell:
        "{params.adpa} summary --params {params.stage:q} --results {params.results:q} --csv {output.csv:q}"
        " --markdown {output.markdown:q} --metrics-plot {output.metrics:q} --loss-plot {output.losses:q}"
        " --paired-csv {output.paired:q}"
        " 2>&1 | tee {log:q}"
