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
