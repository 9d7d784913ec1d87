# models: materialise base models as plain HF folders; `align` safety-tunes one into a new base.


rule materialise_model:
    output:
        directory("models/base/{model}"),
    wildcard_constraints:
        model=alternation(PLAIN_MODELS),
    params:
        source=lambda wc: config["models"][wc.model]["source"],
        path=lambda wc: (
            f"--path {shlex.quote(config['models'][wc.model]['path'])}"
            if "path" in config["models"][wc.model]
            else ""
        ),
        revision=lambda wc: (
            f"--revision {shlex.quote(config['models'][wc.model]['revision'])}"
            if "revision" in config["models"][wc.model]
            else ""
        ),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/models/{model}.log",
    benchmark:
        "benchmarks/materialise_model/{model}.tsv"
    shell:
        "python -m workflow_scripts.models --source {params.source} {params.path} {params.revision} --output {output} > {log} 2>&1"


rule align:
    input:
        base=lambda wc: f"models/base/{config['models'][wc.model]['base']}",
        data=lambda wc: [raw(d) for d in config["models"][wc.model]["data"]],
    output:
        directory("models/base/{model}"),
    wildcard_constraints:
        model=alternation(ALIGNED_MODELS),
    params:
        recipe=lambda wc: recipe_json(align_recipe(wc)),
        seed=0,
        checkpoints="checkpoints/base/{model}",
        run_name=lambda wc: f"{wc.model}/seed0/align",
    threads: job_threads("gpu_train")
    resources:
        **job_class("gpu_train", gpus=lambda wc: align_recipe(wc).get("gpus")),
    conda:
        gpu_env()
    log:
        "logs/models/{model}.log",
    benchmark:
        "benchmarks/align/{model}.tsv"
    shell:
        TRAIN_COMMAND


rule toxicity_model:
    output:
        directory("models/detoxify/{model_type}"),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/models/detoxify_{model_type}.log",
    benchmark:
        "benchmarks/toxicity_model/detoxify_{model_type}.tsv"
    shell:
        "python -m workflow_scripts.toxicity download --model_type {wildcards.model_type} --out {output} > {log} 2>&1"
