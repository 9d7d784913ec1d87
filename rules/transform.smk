# The training set: the last method step's output (rules/methods/<method>.smk), or the raw data without one.


rule train_data:
    input:
        train_data,
    output:
        "data/{exp}/train.parquet",
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/train_data.log",
    benchmark:
        "benchmarks/train_data/{exp}/train_data.tsv"
    shell:
        "cp {input} {output} 2> {log}"


# Filter measures of the method chain: rows in/added/kept/dropped per step and, where a harmful mix upstream
# labelled the rows (`unsafe`), precision, recall, F1 and score AUC of what each step dropped.
rule filter_measures:
    input:
        tables=lambda wc: [raw(exp_cfg(wc.exp)["train"]), *method_steps(wc.exp)],
        decisions=lambda wc: [s.removesuffix(".parquet") + ".decisions.parquet" for s in method_steps(wc.exp)],
    output:
        "results/{exp}/filter.json",
    params:
        steps=lambda wc: " ".join(s["method"] for s in exp_cfg(wc.exp).get("methods", [])),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/filter_measures.log",
    benchmark:
        "benchmarks/filter_measures/{exp}/filter_measures.tsv"
    shell:
        "python -m workflow_scripts.filter_measures --steps {params.steps} --tables {input.tables} "
        "--decisions {input.decisions} --output {output} > {log} 2>&1"
