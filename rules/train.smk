# train: fine-tune the experiment's base model on its (transformed) training data, one run per seed, with the
# recipe's objective (sft, weighted_sft, dpo); `align` in models.smk runs the same command.


rule train:
    input:
        base=lambda wc: base_model(wc.exp),
        data="data/{exp}/train.parquet",
    output:
        directory("models/{exp}/seed{seed}"),
    params:
        recipe=lambda wc: recipe_json(exp_recipe(wc)),
        seed=lambda wc: wc.seed,
        checkpoints="checkpoints/{exp}/seed{seed}",
        run_name=lambda wc: f"{wc.exp}/seed{wc.seed}/train",
    threads: job_threads("gpu_train")
    resources:
        **job_class("gpu_train", gpus=lambda wc: exp_recipe(wc).get("gpus")),
    conda:
        gpu_env()
    log:
        "logs/{exp}/train_seed{seed}.log",
    benchmark:
        "benchmarks/train/{exp}/train_seed{seed}.tsv"
    shell:
        TRAIN_COMMAND
