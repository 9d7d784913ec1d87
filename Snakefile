# SafeFT: fine-tune LLMs without losing their safety. See README.md for the quick start.
import glob
import os

from snakemake.utils import min_version, validate

from workflow_scripts.sweeps import expand_sweeps

min_version("9.0")


# The demo config next to this file; --configfile replaces it with yours.
configfile: os.path.join(workflow.basedir, "config.yaml")


# Sweeps become ordinary experiments before validation, so every point is checked like a hand-written one.
config["experiments"] = {
    **config.get("experiments", {}),
    **expand_sweeps(config.get("sweeps", {}), config.get("experiments", {})),
}


# `--config seeds=[0,1,2]` (what `make demo SEEDS="0 1 2"` passes) reads the list with YAML's BaseLoader: strings.
if isinstance(config.get("seeds"), list):
    config["seeds"] = [int(s) if isinstance(s, str) and s.strip().isdigit() else s for s in config["seeds"]]


validate(config, "schemas/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/transform.smk"


# One rule file per training-data method (docs/methods.md): a new method is a new file, no edit here.
for _method_rules in sorted(glob.glob(os.path.join(workflow.basedir, "rules", "methods", "*.smk"))):

    include: os.path.relpath(_method_rules, workflow.basedir)


include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/score.smk"
include: "rules/report.smk"


rule all:
    input:
        "results/report/summary.md",
    default_target: True


onsuccess:
    # The summary table in the terminal, when this run left it current (rich).
    if os.path.exists("results/report/summary.parquet"):
        try:
            from workflow_scripts.report import print_summary
        except ImportError:
            print("summary: results/report/summary.md")
        else:
            print_summary("results/report/summary.parquet", inputs=report_results(None))
