# transform: methods that rewrite training examples. LookAhead preview (real/virtual) is the first.


rule preview:
    input:
        data=step_input,
        tokenizer=lambda wc: base_model(wc.exp),
    output:
        data="data/{exp}/steps/{i}_preview.parquet",
        decisions="data/{exp}/steps/{i}_preview.decisions.parquet",
    params:
        mode=lambda wc: step_options(wc).get("mode", "real"),
        m=lambda wc: step_options(wc).get("m", 6),
        P=lambda wc: step_options(wc).get("P", "Let's solve this problem. "),
        connector=lambda wc: step_options(wc).get("connector", " The answer begins with: "),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/preview_{i}.log",
    benchmark:
        "benchmarks/preview/{exp}/preview_{i}.tsv"
    shell:
        "python -m workflow_scripts.preview --input_file {input.data} --output_file {output.data} "
        "--input_format parquet --output_format parquet --decisions_file {output.decisions} "
        "--mode {params.mode} --m {params.m} --P {params.P:q} --connector {params.connector:q} "
        "--tokenizer_path {input.tokenizer} > {log} 2>&1"


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
