# generate: completions for an eval set through the configured backend (hf, vllm, openai).


rule generate:
    input:
        model=generation_model,
        prompts=lambda wc: raw(config["evalsets"][wc.evalset]["dataset"]),
    output:
        "generations/{exp}/seed{seed}/{evalset}.parquet",
    wildcard_constraints:
        exp=generated_one_by_one(),
    params:
        args=generation_args,
    threads: job_threads(inference_class(generation_backend()))
    resources:
        **job_class(inference_class(generation_backend())),
    conda:
        gpu_env(generation_backend())
    log:
        "logs/{exp}/generate_seed{seed}_{evalset}.log",
    benchmark:
        "benchmarks/generate/{exp}/generate_seed{seed}_{evalset}.tsv"
    shell:
        "python -m workflow_scripts.generate --model {input.model} --input {input.prompts} {params.args} "
        "--seed {wildcards.seed} --threads {threads} --output {output} > {log} 2>&1"


# generation.per_model_job: every eval set of an experiment's seed in one job, so that the model and the libraries
# load once instead of once per eval set (about 10 s a job on a 2-core CPU; a vLLM engine's start on a GPU). One
# rule per list of eval sets, for the experiments that generate that list. A set that fails takes the job's other
# outputs with it (generation.cache keeps their answers for the rerun).
for _i, (_evalsets, _exps) in enumerate(GENERATION_BUNDLES.items()):

    rule:
        name:
            f"generate_sets{_i}"
        input:
            model=generation_model,
            prompts=[raw(config["evalsets"][s]["dataset"]) for s in _evalsets],
        output:
            [f"generations/{{exp}}/seed{{seed}}/{s}.parquet" for s in _evalsets],
        wildcard_constraints:
            exp=one_of(_exps),
        params:
            common=generation_endpoint_args(),
            sets=generation_sets(_evalsets),
        threads: job_threads(inference_class(generation_backend()))
        resources:
            **job_class(inference_class(generation_backend())),
        conda:
            gpu_env(generation_backend())
        log:
            "logs/{exp}/generate_seed{seed}.log",
        benchmark:
            "benchmarks/generate_sets/{exp}/generate_seed{seed}.tsv"
        shell:
            "python -m workflow_scripts.generate --model {input.model} --sets {params.sets} {params.common} "
            "--seed {wildcards.seed} --threads {threads} > {log} 2>&1"
