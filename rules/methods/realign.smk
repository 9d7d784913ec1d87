# ReAlign: split the step's input into shards by id hash, classify + retrieve + rewrite + filter each shard
# (one job per shard, each with its own request cache so a killed job resumes where it stopped), merge them back.
# The shard count is workflow-wide (Snakemake's scattergather): config key `realign_shards` or --set-scatter.
# Options and their defaults: schemas/methods/realign.schema.yaml and workflow_scripts/realign.py (RealignOptions).
from workflow_scripts import realign

# Shard jobs go to the GPU inference class when any ReAlign step runs a role on a local model (hf or vllm); with
# only OpenAI-compatible servers they just send requests.
REALIGN_JOB_CLASS = inference_class(
    "hf"
    if any(
        realign.runs_local_model({**step, **{k: LLMS[n] for k, n in step_llms(step).items()}})
        for x in config["experiments"].values()
        for step in x.get("methods", [])
        if step["method"] == "realign"
    )
    else "openai"
)


scattergather:
    realign=config.get("realign_shards", 4),


rule realign_split:
    input:
        step_input,
    output:
        temp(scatter.realign("data/{{exp}}/steps/{{i}}_realign/in_{scatteritem}.parquet")),
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/realign_{i}_split.log",
    benchmark:
        "benchmarks/realign_split/{exp}/realign_{i}_split.tsv"
    shell:
        "python -m workflow_scripts.realign split --input {input} --outputs {output} > {log} 2>&1"


rule realign_shard:
    input:
        # The shard, and the local models, tokenizer folder and BM25 corpus the step's options name.
        shard="data/{exp}/steps/{i}_realign/in_{scatteritem}.parquet",
        paths=lambda wc: list(realign.job_paths(step_options(wc), config["models"], base_model(wc.exp)).values()),
        llm_models=step_llm_files,
    output:
        data=temp("data/{exp}/steps/{i}_realign/out_{scatteritem}.parquet"),
        decisions=temp("data/{exp}/steps/{i}_realign/decisions_{scatteritem}.parquet"),
        stats="data/{exp}/steps/{i}_realign/stats_{scatteritem}.json",
    wildcard_constraints:
        scatteritem=r"\d+-of-\d+",
    params:
        # The step's options, with those names replaced by the paths the job reads.
        options=lambda wc: step_json(
            wc, realign.job_paths(step_options(wc), config["models"], base_model(wc.exp))
        ),
        # Kept outside the outputs, so a failed or killed job's answers survive for the rerun.
        cache="data/{exp}/steps/{i}_realign/cache/{scatteritem}",
    threads: job_threads(REALIGN_JOB_CLASS)
    resources:
        **job_class(REALIGN_JOB_CLASS),
    conda:
        # gpu_env's path is relative to rules/, and this file is one folder deeper.
        lambda wc: os.path.join("..", gpu_env(realign.role_backend(json.loads(step_json(wc)), "rewriter")))
    log:
        "logs/{exp}/realign_{i}_{scatteritem}.log",
    benchmark:
        "benchmarks/realign_shard/{exp}/realign_{i}_{scatteritem}.tsv"
    shell:
        "python -m workflow_scripts.realign run --input {input.shard} --output {output.data} "
        "--decisions {output.decisions} --stats {output.stats} --cache_dir {params.cache} --threads {threads} "
        "--options {params.options:q} > {log} 2>&1"


rule realign_merge:
    input:
        data=step_input,
        shards=gather.realign("data/{{exp}}/steps/{{i}}_realign/out_{scatteritem}.parquet"),
        decisions=gather.realign("data/{{exp}}/steps/{{i}}_realign/decisions_{scatteritem}.parquet"),
    output:
        data="data/{exp}/steps/{i}_realign.parquet",
        decisions="data/{exp}/steps/{i}_realign.decisions.parquet",
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/realign_{i}_merge.log",
    benchmark:
        "benchmarks/realign_merge/{exp}/realign_{i}_merge.tsv"
    shell:
        "python -m workflow_scripts.realign merge --input {input.data} --shards {input.shards} "
        "--shard_decisions {input.decisions} --output {output.data} --decisions {output.decisions} > {log} 2>&1"
