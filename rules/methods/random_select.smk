# Random selection, the baseline of every data filter. Options and their defaults:
# schemas/methods/random_select.schema.yaml and workflow_scripts/random_select.py (RandomSelectOptions).


rule random_select:
    input:
        step_input,
    output:
        data="data/{exp}/steps/{i}_random_select.parquet",
        decisions="data/{exp}/steps/{i}_random_select.decisions.parquet",
    params:
        options=step_json,
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/random_select_{i}.log",
    benchmark:
        "benchmarks/random_select/{exp}/random_select_{i}.tsv"
    shell:
        "python -m workflow_scripts.random_select --input {input} --output {output.data} "
        "--decisions {output.decisions} --options {params.options:q} > {log} 2>&1"
