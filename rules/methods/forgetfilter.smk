# ForgetFilter: fine-tune the base on the step's input (the noisy set), continue on the `safe` dataset, generate
# greedily over the noisy set after each, and drop the rows whose ROUGE-1 fell most (`interleave: K` repeats the
# noisy and safe rounds K times, each from the previous state). The rounds are training jobs of the shared lifecycle
# (resumable, GPU class on SLURM); the generations are sharded inference jobs (option `shards`). Options and their
# defaults: schemas/methods/forgetfilter.schema.yaml and workflow_scripts/forgetfilter.py (ForgetFilterOptions).
from workflow_scripts import forgetfilter


rule forgetfilter_train:
    input:
        base=lambda wc: forgetfilter.round_base(wc.exp, wc.i, int(wc.r), wc.phase, base_model(wc.exp)),
        data=lambda wc: (
            step_input(wc)
            if wc.phase == "noisy"
            else [raw(d) for d in forgetfilter.step_options(step_options(wc)).safe_sets]
        ),
    output:
        directory("models/{exp}/forgetfilter_{i}/round{r}_{phase}"),
    wildcard_constraints:
        r=r"\d+",
        phase="noisy|safe",
    params:
        recipe=lambda wc: recipe_json(
            forgetfilter.phase_recipe(forgetfilter.step_options(step_options(wc)), int(wc.r), wc.phase)
        ),
        seed=lambda wc: forgetfilter.step_options(step_options(wc)).seed,
        checkpoints="checkpoints/{exp}/forgetfilter_{i}/round{r}_{phase}",
        run_name="{exp}/forgetfilter_{i}/round{r}_{phase}",
    threads: job_threads("gpu_train")
    resources:
        **job_class("gpu_train", gpus=lambda wc: forgetfilter.step_options(step_options(wc)).recipe.get("gpus")),
    conda:
        os.path.join("..", gpu_env())
    log:
        "logs/{exp}/forgetfilter_{i}_round{r}_{phase}.log",
    benchmark:
        "benchmarks/forgetfilter_train/{exp}/forgetfilter_{i}_round{r}_{phase}.tsv"
    shell:
        TRAIN_COMMAND


rule forgetfilter_generate:
    input:
        data=step_input,
        model="models/{exp}/forgetfilter_{i}/round{r}_{phase}",
    output:
        "data/{exp}/steps/{i}_forgetfilter/round{r}_{phase}_{shard}.parquet",
    wildcard_constraints:
        r=r"\d+",
        phase="noisy|safe",
        shard=r"\d+-of-\d+",
    params:
        options=step_json,
        # Kept outside the outputs, so a killed job's answers survive for the rerun.
        cache="data/{exp}/steps/{i}_forgetfilter/cache/round{r}_{phase}_{shard}.sqlite",
    threads: job_threads("gpu_infer")
    resources:
        **job_class("gpu_infer"),
    conda:
        lambda wc: os.path.join("..", gpu_env(forgetfilter.step_options(step_options(wc)).backend))
    log:
        "logs/{exp}/forgetfilter_{i}_generate_round{r}_{phase}_{shard}.log",
    benchmark:
        "benchmarks/forgetfilter_generate/{exp}/forgetfilter_{i}_round{r}_{phase}_{shard}.tsv"
    shell:
        "python -m workflow_scripts.forgetfilter generate --input {input.data} --model {input.model} "
        "--output {output} --round {wildcards.r} --phase {wildcards.phase} --shard {wildcards.shard} "
        "--cache {params.cache} --threads {threads} --options {params.options:q} > {log} 2>&1"


rule forgetfilter:
    input:
        data=step_input,
        generations=lambda wc: forgetfilter.generation_files(
            wc.exp, wc.i, forgetfilter.step_options(step_options(wc))
        ),
    output:
        data="data/{exp}/steps/{i}_forgetfilter.parquet",
        decisions="data/{exp}/steps/{i}_forgetfilter.decisions.parquet",
        scores="data/{exp}/steps/{i}_forgetfilter.scores.parquet",
        curve="data/{exp}/steps/{i}_forgetfilter.curve.json",
        plot="data/{exp}/steps/{i}_forgetfilter.curve.png",
    params:
        options=step_json,
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/forgetfilter_{i}.log",
    benchmark:
        "benchmarks/forgetfilter/{exp}/forgetfilter_{i}.tsv"
    shell:
        "python -m workflow_scripts.forgetfilter run --input {input.data} --generations {input.generations} "
        "--output {output.data} --decisions {output.decisions} --scores {output.scores} --curve {output.curve} "
        "--options {params.options:q} > {log} 2>&1"
