# score: results/{exp}/{metric}.json (value, n, 95% CI, per seed) and the experiment's manifest.


rule score:
    input:
        metric_generations,
    output:
        result="results/{exp}/{metric}.json",
        examples="results/{exp}/{metric}.examples.parquet",
    wildcard_constraints:
        metric=r"(?!manifest)[a-z0-9_]+",
    params:
        scorer=lambda wc: config["evalsets"][exp_evalset(wc.exp, wc.metric)]["metric"],
        seeds=lambda wc: " ".join(str(s) for s in exp_seeds(wc.exp)),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/{exp}/score_{metric}.log",
    benchmark:
        "benchmarks/{exp}/score_{metric}.tsv"
    shell:
        "python -m workflow_scripts.score --generations {input} --seeds {params.seeds} --metric {params.scorer} "
        "--name {wildcards.metric} --output {output.result} > {log} 2>&1"


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
        "benchmarks/{exp}/manifest.tsv"
    shell:
        "python -m workflow_scripts.manifest --experiment {wildcards.exp} --config_json {params.config:q} "
        "--inputs {input.data} --models {input.models} --generations {input.generations} "
        "--seeds {params.seeds} --output {output} > {log} 2>&1"
