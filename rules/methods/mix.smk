# Harmful-data mix (and SafeInstr's appended safety examples), one method step. Options and their defaults:
# schemas/methods/mix.schema.yaml and workflow_scripts/mix.py (MixOptions).


rule mix:
    input:
        data=step_input,
        # The datasets the step names (`unsafe`, `add`), as their normalised tables.
        datasets=lambda wc: [raw(step_options(wc)[k]) for k in ("unsafe", "add") if k in step_options(wc)],
    output:
        data="data/{exp}/steps/{i}_mix.parquet",
        decisions="data/{exp}/steps/{i}_mix.decisions.parquet",
    params:
        options=lambda wc: step_json(
            wc, {k: raw(step_options(wc)[k]) for k in ("unsafe", "add") if k in step_options(wc)}
        ),
        task_source=lambda wc: exp_cfg(wc.exp)["train"],
    conda:
        "../../envs/cpu.yaml"
    log:
        "logs/{exp}/mix_{i}.log",
    benchmark:
        "benchmarks/mix/{exp}/mix_{i}.tsv"
    shell:
        "python -m workflow_scripts.mix --input {input.data} --task_source {params.task_source} "
        "--output {output.data} --decisions {output.decisions} --options {params.options:q} > {log} 2>&1"
