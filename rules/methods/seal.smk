# SEAL: a selector trained by bilevel optimisation against the step's `safe` dataset keeps the top p of the rows.
# A training job (GPU class on SLURM; resumable from checkpoints/{exp}/seal_{i}). Options and their defaults:
# schemas/methods/seal.schema.yaml and workflow_scripts/seal.py (SealOptions).


rule seal:
    input:
        data=step_input,
        safe=lambda wc: raw(step_options(wc)["safe"]),
        base=lambda wc: base_model(wc.exp),
    output:
        data="data/{exp}/steps/{i}_seal.parquet",
        decisions="data/{exp}/steps/{i}_seal.decisions.parquet",
        selector="data/{exp}/steps/{i}_seal.selector.parquet",
        selector_log="data/{exp}/steps/{i}_seal.selector.log.json",
    params:
        options=lambda wc: step_json(wc, {"safe": raw(step_options(wc)["safe"])}),
        checkpoints="checkpoints/{exp}/seal_{i}",
    threads: job_threads("gpu_train")
    resources:
        **job_class("gpu_train", gpus=lambda wc: step_options(wc).get("gpus")),
    conda:
        os.path.join("..", gpu_env())
    log:
        "logs/{exp}/seal_{i}.log",
    benchmark:
        "benchmarks/seal/{exp}/seal_{i}.tsv"
    shell:
        "python -m workflow_scripts.seal --input {input.data} --output {output.data} --decisions {output.decisions} "
        "--selector {output.selector} --base {input.base} --checkpoint_dir {params.checkpoints} "
        "--threads {threads} --options {params.options:q} > {log} 2>&1"
