# ReAlign: split the step's input into shards by id hash, classify + retrieve + rewrite + filter each shard
# (one job per shard, each with its own request cache so a killed job resumes where it stopped), merge them back.
# The shard count is workflow-wide (Snakemake's scattergather): config key `realign_shards` or --set-scatter.
import shlex


scattergather:
    realign=config.get("realign_shards", 4),


REALIGN_FLAGS = ("classifier_backend", "classifier_base_url", "classifier_api_key_env", "rewriter_backend",
                 "rewriter_base_url", "rewriter_api_key_env", "base_url", "api_key_env", "retriever",
                 "corpus_field", "serper_url", "serper_key_env", "n", "max_new_tokens", "temperature", "top_p",
                 "seed", "concurrency", "timeout", "max_retries")


def realign_model(wildcards, role):
    """A model named in config `models` is its materialised folder; anything else (an API model) as written."""
    name = step_options(wildcards)[f"{role}_model"]
    return f"models/base/{name}" if name in config["models"] else name


def realign_tokenizer(wildcards):
    tok = step_options(wildcards).get("tokenizer")
    return base_model(wildcards.exp) if tok == "base" else tok


def realign_files(wildcards):
    """Local files the shard job reads: the shard, local models, the tokenizer folder and the BM25 corpus."""
    opts = step_options(wildcards)
    files = {"shard": "data/{exp}/steps/{i}_realign/in_{scatteritem}.parquet".format(**wildcards)}
    for role in ("classifier", "rewriter"):
        if opts[f"{role}_model"] in config["models"]:
            files[role] = realign_model(wildcards, role)
    if realign_tokenizer(wildcards):
        files["tokenizer"] = realign_tokenizer(wildcards)
    if opts.get("retriever") == "bm25":
        files["corpus"] = opts["corpus"]
    return files


def realign_args(wildcards):
    opts = step_options(wildcards)
    args = [f"--classifier_model {shlex.quote(realign_model(wildcards, 'classifier'))}",
            f"--rewriter_model {shlex.quote(realign_model(wildcards, 'rewriter'))}"]
    args += [f"--{key} {shlex.quote(str(opts[key]))}" for key in REALIGN_FLAGS if key in opts]
    if realign_tokenizer(wildcards):
        args.append(f"--tokenizer {shlex.quote(realign_tokenizer(wildcards))}")
    if opts.get("retriever") == "bm25":
        args.append(f"--corpus {shlex.quote(opts['corpus'])}")
    return " ".join(args)


rule realign_split:
    input:
        step_input,
    output:
        temp(scatter.realign("data/{{exp}}/steps/{{i}}_realign/in_{scatteritem}.parquet")),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/realign_{i}_split.log",
    benchmark:
        "benchmarks/{exp}/realign_{i}_split.tsv"
    shell:
        "python -m workflow_scripts.realign split --input {input} --outputs {output} > {log} 2>&1"


rule realign_shard:
    input:
        unpack(realign_files),
    output:
        data=temp("data/{exp}/steps/{i}_realign/out_{scatteritem}.parquet"),
        decisions=temp("data/{exp}/steps/{i}_realign/decisions_{scatteritem}.parquet"),
        stats="data/{exp}/steps/{i}_realign/stats_{scatteritem}.json",
    wildcard_constraints:
        scatteritem=r"\d+-of-\d+",
    params:
        args=realign_args,
        # Kept outside the outputs, so a failed or killed job's answers survive for the rerun.
        cache="data/{exp}/steps/{i}_realign/cache/{scatteritem}",
    threads: config.get("threads", 2)
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/realign_{i}_{scatteritem}.log",
    benchmark:
        "benchmarks/{exp}/realign_{i}_{scatteritem}.tsv"
    shell:
        "python -m workflow_scripts.realign run --input {input.shard} --output {output.data} "
        "--decisions {output.decisions} --stats {output.stats} --cache_dir {params.cache} --threads {threads} "
        "{params.args} > {log} 2>&1"


rule realign_merge:
    input:
        data=step_input,
        shards=gather.realign("data/{{exp}}/steps/{{i}}_realign/out_{scatteritem}.parquet"),
        decisions=gather.realign("data/{{exp}}/steps/{{i}}_realign/decisions_{scatteritem}.parquet"),
    output:
        data="data/{exp}/steps/{i}_realign.parquet",
        decisions="data/{exp}/steps/{i}_realign.decisions.parquet",
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/realign_{i}_merge.log",
    benchmark:
        "benchmarks/{exp}/realign_{i}_merge.tsv"
    shell:
        "python -m workflow_scripts.realign merge --input {input.data} --shards {input.shards} "
        "--shard_decisions {input.decisions} --output {output.data} --decisions {output.decisions} > {log} 2>&1"
