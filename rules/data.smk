# data: the demo's generated sets, downloads from public homes, and normalisation to canonical Parquet.


rule demo_data:
    output:
        "data/raw/{dataset}.parquet",
    wildcard_constraints:
        dataset=alternation(DEMO_DATASETS),
    params:
        which=lambda wc: config["datasets"][wc.dataset]["generator"],
        n=lambda wc: config["datasets"][wc.dataset]["n"],
        seed=lambda wc: config["datasets"][wc.dataset].get("seed", 0),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/data/{dataset}.tsv"
    shell:
        "python -m workflow_scripts.demo_data --which {params.which} --n {params.n} --seed {params.seed} --output {output} "
        "> {log} 2>&1"


rule download:
    output:
        "data/download/{dataset}/{filename}",
    params:
        url=lambda wc: config["datasets"][wc.dataset]["url"],
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/download/{dataset}/{filename}.log",
    benchmark:
        "benchmarks/download/{dataset}/{filename}.tsv"
    shell:
        "python -m workflow_scripts.data --url {params.url:q} --download-to {output} > {log} 2>&1"


rule normalise:
    input:
        normalise_input,
    output:
        "data/raw/{dataset}.parquet",
    wildcard_constraints:
        dataset=alternation(FILE_DATASETS),
    params:
        args=normalise_args,
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/data/{dataset}.tsv"
    shell:
        "python -m workflow_scripts.data {params.args} --output {output} > {log} 2>&1"


rule bbq_prepare:
    input:
        lambda wc: config["datasets"][wc.dataset]["bbq"],
    output:
        "data/raw/{dataset}.parquet",
    wildcard_constraints:
        dataset=alternation(BBQ_DATASETS),
    params:
        per_category=lambda wc: (
            f"--per_category {config['datasets'][wc.dataset]['limit']}"
            if "limit" in config["datasets"][wc.dataset]
            else ""
        ),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/data/{dataset}.tsv"
    shell:
        "python -m workflow_scripts.bbq prepare --input {input} {params.per_category} --output {output} > {log} 2>&1"
