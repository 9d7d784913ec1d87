# report: one summary over the report's experiments (all their metrics) against the baseline, with plots for
# Snakemake's HTML report (`snakemake --report report.html`).

REPORT = config["report"]
REPORT_METRICS = list(dict.fromkeys(m for e in REPORT["experiments"] for m in exp_cfg(e)["eval"]))
REPORT_SAFETY = REPORT.get("safety", "safe_rate")
REPORT_UTILITY = REPORT.get("utility", "utility")
REPORT_PLOTS = REPORT.get("plots", True)
# The scatter needs at least one experiment evaluated on both axes' metrics.
REPORT_SCATTER = REPORT_PLOTS and any(
    {REPORT_SAFETY, REPORT_UTILITY} <= set(exp_cfg(e)["eval"]) for e in REPORT["experiments"]
)


rule report:
    input:
        report_results,
    output:
        # Parquet stays out of the HTML report: it has no mimetype there and would show as binary text.
        parquet="results/report/summary.parquet",
        markdown="results/report/summary.md",
        report_md=report(
            "results/report/report.md",
            caption="../report/markdown.rst",
            category="Summary",
            labels={"table": "summary as Markdown"},
        ),
        html=report(
            "results/report/summary.html",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "summary with 95% CIs"},
        ),
        scatter=(
            [
                report(
                    "results/report/safety_vs_utility.png",
                    caption="../report/scatter.rst",
                    category="Plots",
                    subcategory="Safety vs utility",
                    labels={"figure": f"{REPORT_SAFETY} vs {REPORT_UTILITY}"},
                )
            ]
            if REPORT_SCATTER
            else []
        ),
        bars=[
            report(
                f"results/report/bars/{m}.png",
                caption="../report/bars.rst",
                category="Plots",
                subcategory="Per metric",
                labels={"figure": f"{m} by experiment"},
            )
            for m in (REPORT_METRICS if REPORT_PLOTS else [])
        ],
    params:
        experiments=REPORT["experiments"],
        baseline=f"--baseline {REPORT['baseline']}" if "baseline" in REPORT else "",
        notes=json.dumps(
            {e: config["experiments"][e].get("description", "") for e in REPORT["experiments"]},
            sort_keys=True,
        ),
        results=lambda wc, input: [p for p in input if not p.endswith("manifest.json")],
        plots=lambda wc, output: (
            (f"--scatter {output.scatter[0]} " if REPORT_SCATTER else "")
            + ("--bars_dir results/report/bars" if REPORT_PLOTS else "")
        ),
        axes=f"--safety {REPORT_SAFETY} --utility {REPORT_UTILITY}",
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    shell:
        "python -m workflow_scripts.report --results {params.results} --experiments {params.experiments} "
        "{params.baseline} --notes_json {params.notes:q} --parquet {output.parquet} "
        "--markdown {output.markdown} --report_md {output.report_md} --html {output.html} "
        "{params.plots} {params.axes} > {log} 2>&1"
