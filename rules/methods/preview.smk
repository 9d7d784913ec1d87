# LookAhead Tuning's partial answer preview (real / virtual), one method step. Options and their defaults:
# schemas/methods/preview.schema.yaml and workflow_scripts/preview.py (PreviewOptions).


rule preview:
    input:
        data=step_input,
        tokenizer=lambda wc: base_model(wc.exp),
    output:
        data="data/{exp}/steps/{i}_preview.parquet",
        decisions="data/{exp}/steps/{i}_preview.decisions.parquet",
    params:
        options=step_json,
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/preview_{i}.log",
    benchmark:
        "benchmarks/preview/{exp}/preview_{i}.tsv"
    shell:
        "python -m workflow_scripts.preview --input_file {input.data} --output_file {output.data} "
        "--input_format parquet --output_format parquet --decisions_file {output.decisions} "
        "--options {params.options:q} --tokenizer_path {input.tokenizer} > {log} 2>&1"
