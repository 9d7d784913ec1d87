# SafeFT: fine-tune LLMs without losing their safety. See README.md for the quick start.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


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
