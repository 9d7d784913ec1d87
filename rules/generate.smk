# generate: completions for an eval set through the configured backend (hf, vllm, openai).


rule generate:
    input:
        model=generation_model,
        prompts=lambda wc: raw(config["evalsets"][wc.evalset]["dataset"]),
    output:
        "generations/{exp}/seed{seed}/{evalset}.parquet",
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
