# Experiment lookup and input functions shared by every rule file.
import json
import os
import shlex

DEMO_DATASETS = [n for n, d in config["datasets"].items() if "generator" in d]
FILE_DATASETS = [n for n, d in config["datasets"].items() if "generator" not in d]
ALIGNED_MODELS = [n for n, m in config["models"].items() if m["source"] == "align"]
PLAIN_MODELS = [n for n, m in config["models"].items() if m["source"] != "align"]


def alternation(names):
    """A wildcard constraint matching exactly these names (or nothing, when there are none)."""
    return "|".join(sorted(names)) if names else "(?!)"


def check_config():
    """Cross-references the schema cannot express; each error names the key that is wrong."""
    problems = []
    models, datasets = config["models"], config["datasets"]
    recipes, evalsets = config["recipes"], config["evalsets"]
    for name, m in models.items():
        if m["source"] == "align":
            for key in ("base", "data", "recipe"):
                if key not in m:
                    problems.append(f"models.{name}: source align needs `{key}`")
            if m.get("base") not in models:
                problems.append(f"models.{name}.base: unknown model {m.get('base')!r}")
            for d in m.get("data", []):
                if d not in datasets:
                    problems.append(f"models.{name}.data: unknown dataset {d!r}")
            if m.get("recipe") not in recipes:
                problems.append(f"models.{name}.recipe: unknown recipe {m.get('recipe')!r}")
        elif m["source"] in ("gguf", "local", "hub") and "path" not in m:
            problems.append(f"models.{name}: source {m['source']} needs `path`")
    for name, e in evalsets.items():
        if e["dataset"] not in datasets:
            problems.append(f"evalsets.{name}.dataset: unknown dataset {e['dataset']!r}")
    for name, x in config["experiments"].items():
        if x["model"] not in models:
            problems.append(f"experiments.{name}.model: unknown model {x['model']!r}")
        if "train" in x:
            if x["train"] not in datasets:
                problems.append(f"experiments.{name}.train: unknown dataset {x['train']!r}")
            if x.get("recipe") not in recipes:
                problems.append(f"experiments.{name}.recipe: unknown recipe {x.get('recipe')!r}")
        elif x.get("methods"):
            problems.append(f"experiments.{name}.methods: methods need training data (`train`)")
        for metric, ev in x["eval"].items():
            if ev not in evalsets:
                problems.append(f"experiments.{name}.eval.{metric}: unknown evalset {ev!r}")
    for name in config["report"]["experiments"] + [config["report"].get("baseline")]:
        if name is not None and name not in config["experiments"]:
            problems.append(f"report: unknown experiment {name!r}")
    if problems:
        raise ValueError("config.yaml: " + "; ".join(problems))


check_config()


wildcard_constraints:
    dataset=r"[A-Za-z0-9_\-]+",
    exp=r"[A-Za-z0-9_\-]+",
    evalset=r"[A-Za-z0-9_\-]+",
    seed=r"\d+",
    i=r"\d+",


def exp_cfg(exp):
    try:
        return config["experiments"][exp]
    except KeyError:
        raise ValueError(f"unknown experiment {exp!r}; config.yaml defines: {', '.join(config['experiments'])}")


def exp_seeds(exp):
    return exp_cfg(exp).get("seeds") or config.get("seeds", [0])


def raw(dataset):
    return f"data/raw/{dataset}.parquet"


def method_steps(exp):
    """Paths of the experiment's method chain, in order (empty for no method)."""
    methods = exp_cfg(exp).get("methods", [])
    return [f"data/{exp}/steps/{i}_{m['method']}.parquet" for i, m in enumerate(methods, 1)]


def step_input(wildcards):
    """The data a method step reads: the previous step, or the raw training set for the first."""
    i = int(wildcards.i)
    return method_steps(wildcards.exp)[i - 2] if i > 1 else raw(exp_cfg(wildcards.exp)["train"])


def step_options(wildcards):
    return exp_cfg(wildcards.exp)["methods"][int(wildcards.i) - 1]


def train_data(wildcards):
    steps = method_steps(wildcards.exp)
    return steps[-1] if steps else raw(exp_cfg(wildcards.exp)["train"])


def base_model(exp):
    return f"models/base/{exp_cfg(exp)['model']}"


def generation_model(wildcards):
    """The fine-tuned model of this seed, or the base model itself for an experiment without training."""
    if "train" in exp_cfg(wildcards.exp):
        return f"models/{wildcards.exp}/seed{wildcards.seed}"
    return base_model(wildcards.exp)


def exp_evalset(exp, metric):
    try:
        return exp_cfg(exp)["eval"][metric]
    except KeyError:
        raise ValueError(f"experiment {exp!r} has no eval.{metric} in config.yaml")


def exp_config_subtree(exp):
    """Everything that defines one experiment; its hash goes into the manifest."""
    x = exp_cfg(exp)
    model = config["models"][x["model"]]
    models = {x["model"]: model}
    if model["source"] == "align":
        models[model["base"]] = config["models"][model["base"]]
    datasets = [x.get("train")] + [config["evalsets"][e]["dataset"] for e in x["eval"].values()]
    datasets += model.get("data", [])
    return {
        "experiment": x,
        "models": models,
        "datasets": {d: config["datasets"][d] for d in datasets if d},
        "recipe": config["recipes"].get(x.get("recipe")),
        "evalsets": {e: config["evalsets"][e] for e in x["eval"].values()},
        "seeds": exp_seeds(exp),
    }


# used by data.smk
def download_name(wildcards):
    url = config["datasets"][wildcards.dataset]["url"]
    return f"data/download/{wildcards.dataset}/{url.rsplit('/', 1)[-1]}"


# used by data.smk
def normalise_input(wildcards):
    """A downloaded file, or the user's local path (declared only when it exists, so a dry run can plan an
    experiment whose gated data the user has not fetched yet; the job then fails with a clear message)."""
    d = config["datasets"][wildcards.dataset]
    if "path" in d:
        return [d["path"]] if os.path.exists(d["path"]) else []
    return [download_name(wildcards)]


# used by data.smk
def normalise_args(wildcards):
    d = config["datasets"][wildcards.dataset]
    args = [f"--source {wildcards.dataset}"]
    if "path" in d:
        args.append(f"--input {shlex.quote(d['path'])}")
    else:
        args.append(f"--input {shlex.quote(download_name(wildcards))}")
    for key in ("preset", "format", "limit"):
        if key in d:
            args.append(f"--{key} {d[key]}")
    for key, column in d.get("fields", {}).items():
        args.append(f"--field {shlex.quote(f'{key}={column}')}")
    return " ".join(args)


# used by generate.smk
def generation_args(wildcards):
    e = config["evalsets"][wildcards.evalset]
    g = config.get("generation", {})
    args = [
        f"--backend {g.get('backend', 'hf')}",
        f"--batch_size {g.get('batch_size', 16)}",
        f"--max_new_tokens {e.get('max_new_tokens', 256)}",
        f"--temperature {e.get('temperature', 0)}",
        f"--top_p {e.get('top_p', 1)}",
    ]
    if "limit" in e:
        args.append(f"--limit {e['limit']}")
    for key in ("base_url", "api_key_env"):
        if key in g:
            args.append(f"--{key} {shlex.quote(str(g[key]))}")
    return " ".join(args)


# used by report.smk
def report_results(wildcards):
    out = []
    for exp in config["report"]["experiments"]:
        out += [f"results/{exp}/{metric}.json" for metric in exp_cfg(exp)["eval"]]
        out.append(f"results/{exp}/manifest.json")
    return out


# used by score.smk
def metric_generations(wildcards):
    evalset = exp_evalset(wildcards.exp, wildcards.metric)
    return [f"generations/{wildcards.exp}/seed{s}/{evalset}.parquet" for s in exp_seeds(wildcards.exp)]


# used by score.smk
def manifest_inputs(wildcards):
    x = exp_cfg(wildcards.exp)
    seeds = exp_seeds(wildcards.exp)
    data = ["data/{exp}/train.parquet".format(**wildcards)] if "train" in x else []
    data += [raw(config["evalsets"][e]["dataset"]) for e in x["eval"].values()]
    models = [f"models/{wildcards.exp}/seed{s}" for s in seeds] if "train" in x else []
    gens = [f"generations/{wildcards.exp}/seed{s}/{e}.parquet" for s in seeds for e in x["eval"].values()]
    return {"data": data, "models": models, "generations": gens}

