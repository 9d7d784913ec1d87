# report: one summary table over the report's experiments (all their metrics), with the baseline as reference.


rule report:
    input:
        report_results,
    output:
        parquet="results/report/summary.parquet",
        markdown="results/report/summary.md",
    params:
        experiments=config["report"]["experiments"],
        baseline=(
            f"--baseline {config['report']['baseline']}" if "baseline" in config["report"] else ""
        ),
        notes=json.dumps(
            {e: config["experiments"][e].get("description", "") for e in config["report"]["experiments"]},
            sort_keys=True,
        ),
        results=lambda wc, input: [p for p in input if not p.endswith("manifest.json")],
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    shell:
        "python -m workflow_scripts.report --results {params.results} --experiments {params.experiments} "
        "{params.baseline} --notes_json {params.notes:q} "
        "--parquet {output.parquet} --markdown {output.markdown} > {log} 2>&1"
