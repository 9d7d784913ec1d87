# data: the demo's generated sets, downloads from public homes and the Hugging Face Hub, and normalisation to
# canonical Parquet.


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
        "benchmarks/demo_data/{dataset}.tsv"
    shell:
        "python -m workflow_scripts.demo_data --which {params.which} --n {params.n} --seed {params.seed} --output {output} "
        "> {log} 2>&1"


rule download:
    output:
        "data/download/{dataset}/{filename}",
    wildcard_constraints:
        dataset=alternation(URL_DATASETS),
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


rule download_hub:
    output:
        data="data/download/{dataset}/hub.parquet",
        info="data/download/{dataset}/hub.json",
    wildcard_constraints:
        dataset=alternation(HUB_DATASETS),
    params:
        args=hub_args,
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/download/{dataset}/hub.log",
    benchmark:
        "benchmarks/download_hub/{dataset}.tsv"
    shell:
        "python -m workflow_scripts.data {params.args} --download-to {output.data} --info {output.info} > {log} 2>&1"


rule normalise:
    input:
        normalise_input,
    output:
        "data/raw/{dataset}.parquet",
    wildcard_constraints:
        dataset=alternation(set(FILE_DATASETS) - set(WHERE_DATASETS)),
    params:
        args=normalise_args,
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/normalise/{dataset}.tsv"
    shell:
        "python -m workflow_scripts.data {params.args} --output {output} > {log} 2>&1"


# The same for a dataset with a `where:` row filter, which also writes its decisions table (id, kept, reason).
rule normalise_where:
    input:
        normalise_input,
    output:
        table="data/raw/{dataset}.parquet",
        decisions="data/raw/{dataset}.where.parquet",
    wildcard_constraints:
        dataset=alternation(WHERE_DATASETS),
    params:
        args=normalise_args,
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/normalise/{dataset}.tsv"
    shell:
        "python -m workflow_scripts.data {params.args} --decisions {output.decisions} --output {output.table} "
        "> {log} 2>&1"


rule bbq_prepare:
    input:
        # Declared only when it exists, as for `path:` datasets: a dry run plans without the user's BBQ files.
        lambda wc: [f] if os.path.exists(f := config["datasets"][wc.dataset]["bbq"]) else [],
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
        answers=lambda wc: config["datasets"][wc.dataset].get("answers", "eval"),
        folder=lambda wc: config["datasets"][wc.dataset]["bbq"],
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/data/{dataset}.log",
    benchmark:
        "benchmarks/bbq_prepare/{dataset}.tsv"
    shell:
        "python -m workflow_scripts.bbq prepare --input {params.folder:q} {params.per_category} --answers {params.answers} "
        "--output {output} > {log} 2>&1"
