# train: SFT of the experiment's base model on its (transformed) training data, one run per seed.


rule train:
    input:
        base=lambda wc: base_model(wc.exp),
        data="data/{exp}/train.parquet",
    output:
        directory("models/{exp}/seed{seed}"),
    params:
        recipe=lambda wc: json.dumps(config["recipes"][exp_cfg(wc.exp)["recipe"]], sort_keys=True),
        checkpoints="checkpoints/{exp}/seed{seed}",
    threads: config.get("threads", 2)
    conda:
        gpu_env()
    log:
        "logs/{exp}/train_seed{seed}.log",
    benchmark:
        "benchmarks/train/{exp}/train_seed{seed}.tsv"
    shell:
        "python -m workflow_scripts.train --base {input.base} --data {input.data} --recipe {params.recipe:q} "
        "--seed {wildcards.seed} --threads {threads} --output {output} --checkpoint_dir {params.checkpoints} "
        "--run_name {wildcards.exp}/seed{wildcards.seed}/train > {log} 2>&1"
