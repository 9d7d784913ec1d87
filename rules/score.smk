# score: results/{exp}/{metric}.json (value, n, 95% CI over seeds and prompts, per seed) + per-example Parquet,
# one rule per kind of scorer (both judge scorers share `judge`), and the experiment's manifest.


rule score:
    input:
        metric_generations,
    output:
        result="results/{exp}/{metric}.json",
        examples="results/{exp}/{metric}.examples.parquet",
    wildcard_constraints:
        metric=alternation(METRICS_BY_RULE.get("score", [])),
    params:
        scorer=lambda wc: eval_spec(wc.exp, wc.metric)["metric"],
        seeds=lambda wc: " ".join(str(s) for s in exp_seeds(wc.exp)),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/score_{metric}.log",
    benchmark:
        "benchmarks/score/{exp}/score_{metric}.tsv"
    shell:
        "python -m workflow_scripts.score --generations {input} --seeds {params.seeds} --metric {params.scorer} "
        "--name {wildcards.metric} --output {output.result} > {log} 2>&1"


rule judge:
    input:
        unpack(judge_inputs),
    output:
        result="results/{exp}/{metric}.json",
        examples="results/{exp}/{metric}.examples.parquet",
    wildcard_constraints:
        metric=alternation(METRICS_BY_RULE.get("judge", [])),
    params:
        command=judge_command,
        args=judge_args,
        seeds=lambda wc: " ".join(str(s) for s in exp_seeds(wc.exp)),
    threads: job_threads("gpu_infer")
    resources:
        **job_class("gpu_infer"),
    conda:
        lambda wc: gpu_env(judge_backend(wc))
    log:
        "logs/{exp}/judge_{metric}.log",
    benchmark:
        "benchmarks/judge/{exp}/judge_{metric}.tsv"
    shell:
        "python -m workflow_scripts.judge {params.command} --generations {input.generations} --seeds {params.seeds} "
        "{params.args} --threads {threads} --name {wildcards.metric} --output {output.result} > {log} 2>&1"


rule toxicity:
    input:
        generations=metric_generations,
        classifier=lambda wc: toxicity_files(wc)["inputs"],
    output:
        result="results/{exp}/{metric}.json",
        examples="results/{exp}/{metric}.examples.parquet",
    wildcard_constraints:
        metric=alternation(METRICS_BY_RULE.get("toxicity", [])),
    params:
        seeds=lambda wc: " ".join(str(s) for s in exp_seeds(wc.exp)),
        checkpoint=lambda wc: toxicity_files(wc)["checkpoint"],
        backbone=lambda wc: toxicity_files(wc)["backbone"],
    threads: config.get("threads", 2)
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/toxicity_{metric}.log",
    benchmark:
        "benchmarks/toxicity/{exp}/toxicity_{metric}.tsv"
    shell:
        "python -m workflow_scripts.toxicity score --generations {input.generations} --seeds {params.seeds} "
        "--checkpoint {params.checkpoint} --backbone {params.backbone} --threads {threads} "
        "--name {wildcards.metric} --output {output.result} > {log} 2>&1"


rule bbq_score:
    input:
        generations=metric_generations,
        eval_set=bbq_eval_set,
    output:
        result="results/{exp}/{metric}.json",
        examples="results/{exp}/{metric}.examples.parquet",
    wildcard_constraints:
        metric=alternation(METRICS_BY_RULE.get("bbq_score", [])),
    params:
        seeds=lambda wc: " ".join(str(s) for s in exp_seeds(wc.exp)),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/bbq_{metric}.log",
    benchmark:
        "benchmarks/bbq_score/{exp}/bbq_{metric}.tsv"
    shell:
        "python -m workflow_scripts.bbq score --generations {input.generations} --seeds {params.seeds} "
        "--eval_set {input.eval_set} --name {wildcards.metric} --output {output.result} > {log} 2>&1"


rule manifest:
    input:
        unpack(manifest_inputs),
    output:
        "results/{exp}/manifest.json",
    params:
        config=lambda wc: json.dumps(exp_config_subtree(wc.exp), sort_keys=True),
        seeds=lambda wc: " ".join(str(s) for s in exp_seeds(wc.exp)),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/manifest.log",
    benchmark:
        "benchmarks/manifest/{exp}/manifest.tsv"
    shell:
        "python -m workflow_scripts.manifest --experiment {wildcards.exp} --config_json {params.config:q} "
        "--inputs {input.data} --models {input.models} --generations {input.generations} "
        "--downloads {input.downloads} --seeds {params.seeds} --output {output} > {log} 2>&1"
