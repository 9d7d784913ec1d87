# ReverseGen: a proposer, DPO-trained round after round, writes instructions the target fails on; the last
# proposer's failures, answered safely, are added to the step's data. Rounds are the {r} wildcard: round r samples
# from proposer r-1 (0: the warm-up SFT), dedups, labels and pairs; its DPO makes proposer r; round N+1 only samples
# and labels. The per-round jobs do not read `rounds`, so raising it runs only the new rounds. Options and defaults:
# schemas/methods/reversegen.schema.yaml and workflow_scripts/reversegen.py (ReverseGenOptions).
from workflow_scripts import reversegen


rule reversegen_warmup_data:
    input:
        seeds=lambda wc: raw(step_options(wc)["seeds"]),
    output:
        "data/{exp}/steps/{i}_reversegen/warmup.parquet",
    params:
        options=lambda wc: reversegen.stage_json(step_json(wc), "sample"),
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/reversegen_{i}_warmup_data.log",
    shell:
        "python -m workflow_scripts.reversegen warmup --seeds {input.seeds} --output {output} "
        "--options {params.options:q} > {log} 2>&1"


rule reversegen_warmup:
    input:
        base=lambda wc: f"models/base/{step_options(wc)['proposer']}",
        data="data/{exp}/steps/{i}_reversegen/warmup.parquet",
    output:
        directory("models/{exp}/reversegen_{i}/proposer0"),
    params:
        recipe=lambda wc: recipe_json(reversegen.warmup_recipe(reversegen.step_options(step_options(wc)))),
        seed=lambda wc: reversegen.step_options(step_options(wc)).seed,
        checkpoints="checkpoints/{exp}/reversegen_{i}/proposer0",
        run_name="{exp}/reversegen_{i}/proposer0",
    threads: job_threads("gpu_train")
    resources:
        **job_class(
            "gpu_train", gpus=lambda wc: reversegen.warmup_recipe(reversegen.step_options(step_options(wc))).get("gpus")
        ),
    conda:
        os.path.join("..", gpu_env())
    log:
        "logs/{exp}/reversegen_{i}_proposer0.log",
    benchmark:
        "benchmarks/reversegen_warmup/{exp}/reversegen_{i}.tsv"
    shell:
        TRAIN_COMMAND


rule reversegen_propose:
    input:
        seeds=lambda wc: raw(step_options(wc)["seeds"]),
        model=lambda wc: reversegen.proposer_model(wc.exp, wc.i, int(wc.r) - 1),
    output:
        "data/{exp}/steps/{i}_reversegen/round{r}.proposals.parquet",
    wildcard_constraints:
        r=r"[1-9]\d*",
    params:
        options=lambda wc: reversegen.stage_json(step_json(wc), "sample"),
        # Kept outside the outputs, so a killed job's samples survive for the rerun.
        cache="data/{exp}/steps/{i}_reversegen/cache/round{r}.proposals.sqlite",
    threads: job_threads("gpu_infer")
    resources:
        **job_class("gpu_infer"),
    conda:
        lambda wc: os.path.join("..", gpu_env(reversegen.step_options(step_options(wc)).backend))
    log:
        "logs/{exp}/reversegen_{i}_round{r}_propose.log",
    benchmark:
        "benchmarks/reversegen_propose/{exp}/reversegen_{i}_round{r}.tsv"
    shell:
        "python -m workflow_scripts.reversegen propose --seeds {input.seeds} --model {input.model} "
        "--output {output} --round {wildcards.r} --cache {params.cache} --threads {threads} "
        "--options {params.options:q} > {log} 2>&1"


rule reversegen_dedup:
    input:
        "data/{exp}/steps/{i}_reversegen/round{r}.proposals.parquet",
    output:
        decisions="data/{exp}/steps/{i}_reversegen/round{r}.dedup.parquet",
        stats="data/{exp}/steps/{i}_reversegen/round{r}.diversity.json",
    wildcard_constraints:
        r=r"[1-9]\d*",
    params:
        options=lambda wc: reversegen.stage_json(step_json(wc), "sample"),
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/reversegen_{i}_round{r}_dedup.log",
    benchmark:
        "benchmarks/reversegen_dedup/{exp}/reversegen_{i}_round{r}.tsv"
    shell:
        "python -m workflow_scripts.reversegen dedup --input {input} --output {output.decisions} "
        "--stats {output.stats} --round {wildcards.r} --options {params.options:q} > {log} 2>&1"


rule reversegen_answer:
    input:
        proposals="data/{exp}/steps/{i}_reversegen/round{r}.proposals.parquet",
        decisions="data/{exp}/steps/{i}_reversegen/round{r}.dedup.parquet",
        target=lambda wc: base_model(wc.exp),
    output:
        "data/{exp}/steps/{i}_reversegen/round{r}.answers.parquet",
    wildcard_constraints:
        r=r"[1-9]\d*",
    params:
        options=lambda wc: reversegen.stage_json(step_json(wc), "answer"),
        cache="data/{exp}/steps/{i}_reversegen/cache/round{r}.answers.sqlite",
    threads: job_threads("gpu_infer")
    resources:
        **job_class("gpu_infer"),
    conda:
        lambda wc: os.path.join("..", gpu_env(reversegen.step_options(step_options(wc)).backend))
    log:
        "logs/{exp}/reversegen_{i}_round{r}_answer.log",
    benchmark:
        "benchmarks/reversegen_answer/{exp}/reversegen_{i}_round{r}.tsv"
    shell:
        "python -m workflow_scripts.reversegen answer --proposals {input.proposals} --decisions {input.decisions} "
        "--target {input.target} --output {output} --round {wildcards.r} --cache {params.cache} "
        "--threads {threads} --options {params.options:q} > {log} 2>&1"


# A job of its own: on one GPU, the labeller's engine loads after the target's has gone.
rule reversegen_label:
    input:
        answers="data/{exp}/steps/{i}_reversegen/round{r}.answers.parquet",
        llms=lambda wc: llm_model_files(reversegen.label_llms(step_options(wc))),
    output:
        "data/{exp}/steps/{i}_reversegen/round{r}.labels.parquet",
    wildcard_constraints:
        r=r"[1-9]\d*",
    params:
        options=lambda wc: reversegen.stage_json(
            step_json(wc, reversegen.labeller_fields(step_options(wc), LLMS)), "label"
        ),
        cache="data/{exp}/steps/{i}_reversegen/cache/round{r}.labels.sqlite",
    threads: job_threads("gpu_infer")
    resources:
        **job_class("gpu_infer"),
    conda:
        lambda wc: os.path.join("..", gpu_env(reversegen.step_options(step_options(wc)).backend))
    log:
        "logs/{exp}/reversegen_{i}_round{r}_label.log",
    benchmark:
        "benchmarks/reversegen_label/{exp}/reversegen_{i}_round{r}.tsv"
    shell:
        "python -m workflow_scripts.reversegen label --answers {input.answers} --output {output} "
        "--round {wildcards.r} --cache {params.cache} --threads {threads} --options {params.options:q} > {log} 2>&1"


rule reversegen_pairs:
    input:
        "data/{exp}/steps/{i}_reversegen/round{r}.labels.parquet",
    output:
        "data/{exp}/steps/{i}_reversegen/round{r}.pairs.parquet",
    wildcard_constraints:
        r=r"[1-9]\d*",
    params:
        options=lambda wc: reversegen.stage_json(step_json(wc), "label"),
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/reversegen_{i}_round{r}_pairs.log",
    shell:
        "python -m workflow_scripts.reversegen pairs --labels {input} --output {output} --round {wildcards.r} "
        "--options {params.options:q} > {log} 2>&1"


rule reversegen_dpo:
    input:
        base=lambda wc: reversegen.proposer_model(wc.exp, wc.i, int(wc.r) - 1),
        data="data/{exp}/steps/{i}_reversegen/round{r}.pairs.parquet",
    output:
        directory("models/{exp}/reversegen_{i}/proposer{r}"),
    wildcard_constraints:
        r=r"[1-9]\d*",
    params:
        recipe=lambda wc: recipe_json(reversegen.dpo_recipe(reversegen.step_options(step_options(wc)))),
        seed=lambda wc: reversegen.step_options(step_options(wc)).seed,
        checkpoints="checkpoints/{exp}/reversegen_{i}/proposer{r}",
        run_name="{exp}/reversegen_{i}/proposer{r}",
    threads: job_threads("gpu_train")
    resources:
        **job_class(
            "gpu_train", gpus=lambda wc: reversegen.dpo_recipe(reversegen.step_options(step_options(wc))).get("gpus")
        ),
    conda:
        os.path.join("..", gpu_env())
    log:
        "logs/{exp}/reversegen_{i}_proposer{r}.log",
    benchmark:
        "benchmarks/reversegen_dpo/{exp}/reversegen_{i}_round{r}.tsv"
    shell:
        TRAIN_COMMAND


rule reversegen_respond:
    input:
        labels=lambda wc: reversegen.round_files(wc.exp, wc.i, reversegen.step_options(step_options(wc)))["labels"][-1],
        target=lambda wc: base_model(wc.exp),
        llms=lambda wc: llm_model_files([step_options(wc)[k] for k in ("safe_model",) if k in step_options(wc)]),
    output:
        "data/{exp}/steps/{i}_reversegen/responses.parquet",
    params:
        options=lambda wc: step_json(wc, reversegen.labeller_fields(step_options(wc), LLMS)),
        cache="data/{exp}/steps/{i}_reversegen/cache/responses.sqlite",
    threads: job_threads("gpu_infer")
    resources:
        **job_class("gpu_infer"),
    conda:
        lambda wc: os.path.join("..", gpu_env(reversegen.step_options(step_options(wc)).backend))
    log:
        "logs/{exp}/reversegen_{i}_respond.log",
    benchmark:
        "benchmarks/reversegen_respond/{exp}/reversegen_{i}.tsv"
    shell:
        "python -m workflow_scripts.reversegen respond --labels {input.labels} --target {input.target} "
        "--output {output} --cache {params.cache} --threads {threads} --options {params.options:q} > {log} 2>&1"


rule reversegen:
    input:
        data=step_input,
        responses="data/{exp}/steps/{i}_reversegen/responses.parquet",
        labels=lambda wc: reversegen.round_files(wc.exp, wc.i, reversegen.step_options(step_options(wc)))["labels"],
        diversity=lambda wc: reversegen.round_files(wc.exp, wc.i, reversegen.step_options(step_options(wc)))[
            "diversity"
        ],
        pairs=lambda wc: reversegen.round_files(wc.exp, wc.i, reversegen.step_options(step_options(wc)))["pairs"],
    output:
        data="data/{exp}/steps/{i}_reversegen.parquet",
        decisions="data/{exp}/steps/{i}_reversegen.decisions.parquet",
        rounds="data/{exp}/steps/{i}_reversegen.rounds.json",
    params:
        options=lambda wc: step_json(wc, reversegen.labeller_fields(step_options(wc), LLMS)),
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/reversegen_{i}.log",
    benchmark:
        "benchmarks/reversegen/{exp}/reversegen_{i}.tsv"
    shell:
        "python -m workflow_scripts.reversegen run --input {input.data} --responses {input.responses} "
        "--labels {input.labels} --diversity {input.diversity} --pairs {input.pairs} --output {output.data} "
        "--decisions {output.decisions} --rounds_json {output.rounds} --options {params.options:q} > {log} 2>&1"


# The per-round metrics where the report and a user look for an experiment's results.
rule reversegen_rounds:
    input:
        lambda wc: method_steps(wc.exp)[reversegen.step_index(exp_cfg(wc.exp)["methods"]) - 1].removesuffix(".parquet")
        + ".rounds.json",
    output:
        "results/{exp}/rounds.json",
    localrule: True
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/reversegen_rounds.log",
    shell:
        "cp {input} {output} 2> {log}"
