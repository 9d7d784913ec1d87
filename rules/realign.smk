# ReAlign: split the step's input into shards by id hash, classify + retrieve + rewrite + filter each shard
# (one job per shard, each with its own request cache so a killed job resumes where it stopped), merge them back.
# The shard count is workflow-wide (Snakemake's scattergather): config key `realign_shards` or --set-scatter.
scattergather:
    realign=config.get("realign_shards", 4),


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
        "benchmarks/realign_split/{exp}/realign_{i}_split.tsv"
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
        lambda wc: gpu_env(step_options(wc).get("rewriter_backend", "hf"))
    log:
        "logs/{exp}/realign_{i}_{scatteritem}.log",
    benchmark:
        "benchmarks/realign_shard/{exp}/realign_{i}_{scatteritem}.tsv"
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
        "benchmarks/realign_merge/{exp}/realign_{i}_merge.tsv"
    shell:
        "python -m workflow_scripts.realign merge --input {input.data} --shards {input.shards} "
        "--shard_decisions {input.decisions} --output {output.data} --decisions {output.decisions} > {log} 2>&1"
