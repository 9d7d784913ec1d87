# report: one summary over the report's experiments (all their metrics) against the baseline, with plots for
# Snakemake's HTML report (`snakemake --report report.html`).

REPORT = config["report"]
REPORT_METRICS = list(dict.fromkeys(m for e in REPORT["experiments"] for m in exp_cfg(e)["eval"]))
REPORT_SAFETY = REPORT.get("safety", "safe_rate")
REPORT_UTILITY = REPORT.get("utility", "utility")
REPORT_PLOTS = REPORT.get("plots", True)
# Over-refusal metrics (benign prompts) of the report's experiments: with the safety metric they make the
# `handled_right` score (harmful refused + benign answered) and the safety vs over-refusal scatter.
REPORT_BENIGN = REPORT.get(
    "benign",
    [m for m in REPORT_METRICS if any(m in exp_cfg(e)["eval"] and eval_spec(e, m)["metric"] == "over_refusal"
                                      for e in REPORT["experiments"])],
)
REPORT_HANDLED = bool(REPORT_BENIGN) and any(
    {REPORT_SAFETY, *REPORT_BENIGN} <= set(exp_cfg(e)["eval"]) for e in REPORT["experiments"]
)
REPORT_REFUSAL_SCATTER = REPORT_PLOTS and bool(REPORT_BENIGN) and any(
    {REPORT_SAFETY, REPORT_BENIGN[0]} <= set(exp_cfg(e)["eval"]) for e in REPORT["experiments"]
)
# Training-loss curves: every training job of the report's experiments, one panel per method chain.
REPORT_TRAINED = [e for e in REPORT["experiments"] if "train" in exp_cfg(e)]
REPORT_CURVES = REPORT_PLOTS and bool(REPORT_TRAINED)
# The scatter needs at least one experiment evaluated on both axes' metrics.
REPORT_SCATTER = REPORT_PLOTS and any(
    {REPORT_SAFETY, REPORT_UTILITY} <= set(exp_cfg(e)["eval"]) for e in REPORT["experiments"]
)


rule report:
    input:
        results=report_results,
        models=report_models,
        # filter measures of the chains that mix in labelled unsafe rows and then may drop some
        filters=lambda wc: [f"results/{e}/filter.json" for e in REPORT["experiments"] if labelled_chain(exp_cfg(e))],
        # per-round metrics of ReverseGen chains (failure rate and diversity of each round's proposals)
        rounds=lambda wc: [
            f"results/{e}/rounds.json"
            for e in REPORT["experiments"]
            if any(s["method"] == "reversegen" for s in exp_cfg(e).get("methods", []))
        ],
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
        refusal_scatter=(
            [
                report(
                    "results/report/safety_vs_over_refusal.png",
                    caption="../report/refusal_scatter.rst",
                    category="Plots",
                    subcategory="Safety vs over-refusal",
                    labels={"figure": f"{REPORT_SAFETY} vs {REPORT_BENIGN[0]}"},
                )
            ]
            if REPORT_REFUSAL_SCATTER
            else []
        ),
        runtime="results/report/runtime.parquet",
        curves=(
            [
                report(
                    "results/report/training_curves.png",
                    caption="../report/curves.rst",
                    category="Plots",
                    subcategory="Training",
                    labels={"figure": "training loss per method chain"},
                )
            ]
            if REPORT_CURVES
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
            for m in (REPORT_METRICS + (["handled_right"] if REPORT_HANDLED else []) if REPORT_PLOTS else [])
        ],
    params:
        experiments=REPORT["experiments"],
        baseline=f"--baseline {REPORT['baseline']}" if "baseline" in REPORT else "",
        notes=json.dumps(
            {e: config["experiments"][e].get("description", "") for e in REPORT["experiments"]},
            sort_keys=True,
        ),
        results=lambda wc, input: [p for p in input.results if not p.endswith("manifest.json")],
        curves=lambda wc, input, output: (
            f"--curves {output.curves[0]} --chains_json "
            + shlex.quote(json.dumps({e: chain_label(e) for e in REPORT_TRAINED}, sort_keys=True))
            + " --train_logs "
            + " ".join(f"{m.split('/')[1]}={m}/train_log.json" for m in input.models)
            if REPORT_CURVES
            else ""
        ),
        plots=lambda wc, output: (
            (f"--scatter {output.scatter[0]} " if REPORT_SCATTER else "")
            + (f"--refusal_scatter {output.refusal_scatter[0]} " if REPORT_REFUSAL_SCATTER else "")
            + ("--bars_dir results/report/bars" if REPORT_PLOTS else "")
        ),
        axes=f"--safety {REPORT_SAFETY} --utility {REPORT_UTILITY}"
        + (f" --benign {' '.join(REPORT_BENIGN)}" if REPORT_HANDLED else ""),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    shell:
        "python -m workflow_scripts.report --results {params.results} --experiments {params.experiments} "
        "{params.baseline} --notes_json {params.notes:q} --parquet {output.parquet} "
        "--markdown {output.markdown} --report_md {output.report_md} --html {output.html} "
        "{params.plots} {params.axes} --benchmarks benchmarks --runtime {output.runtime} {params.curves} --filters {input.filters} --rounds {input.rounds} > {log} 2>&1"


# A sweep's own report: each metric against the swept axis, one line per method chain, with the filter measures.
rule sweep_report:
    input:
        unpack(sweep_inputs),
    output:
        directory("results/sweeps/{sweep}"),
    wildcard_constraints:
        sweep=alternation(SWEEPS),
    params:
        points=lambda wc: json.dumps({e: coords for e, _, coords in SWEEPS[wc.sweep]}, sort_keys=True),
        x=lambda wc: sweep_x(wc.sweep),
        baseline=lambda wc: sweep_baseline_arg(wc.sweep),
    conda:
        "../envs/cpu.yaml"
    log:
        "logs/sweep_report_{sweep}.log",
    benchmark:
        "benchmarks/sweep_report/sweep_report_{sweep}.tsv"
    shell:
        "python -m workflow_scripts.sweep_report --sweep {wildcards.sweep} --points_json {params.points:q} "
        "--x {params.x} {params.baseline} --results {input.results} --filters {input.filters} "
        "--out_dir {output} > {log} 2>&1"
