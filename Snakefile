# SafeFT: fine-tune LLMs without losing their safety. See README.md for the quick start.
import os

from snakemake.utils import min_version, validate

min_version("9.0")


# The demo config next to this file; --configfile replaces it with yours.
configfile: os.path.join(workflow.basedir, "config.yaml")


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/transform.smk"
include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/score.smk"
include: "rules/report.smk"


rule all:
    input:
        "results/report/summary.md",
    default_target: True
