# Experiment lookup and input functions shared by every rule file.
import fnmatch
import functools
import json
import os
import re
import shlex

from workflow_scripts.llm import ENDPOINT_FIELDS
from workflow_scripts.methods import llm_options, method_schemas, names_in_steps, step_owners, step_problem
from workflow_scripts.objectives import recipe_problems
from workflow_scripts.sweeps import line_label, sweep_points

DEMO_DATASETS = [n for n, d in config["datasets"].items() if "generator" in d]
FILE_DATASETS = [n for n, d in config["datasets"].items() if "url" in d or "path" in d or "hub" in d]
URL_DATASETS = [n for n, d in config["datasets"].items() if "url" in d]
HUB_DATASETS = [n for n, d in config["datasets"].items() if "hub" in d]
WHERE_DATASETS = [n for n in FILE_DATASETS if "where" in config["datasets"][n]]
ALIGNED_MODELS = [n for n, m in config["models"].items() if m["source"] == "align"]
PLAIN_MODELS = [n for n, m in config["models"].items() if m["source"] != "align"]
LLMS = config.get("llms", {})
# Each method's schema of one step (schemas/methods/<method>.schema.yaml), so a new method needs no edit here.
METHOD_SCHEMAS = method_schemas(os.path.join(workflow.basedir, "schemas", "methods"))


def alternation(names):
    """A wildcard constraint matching exactly these names (or nothing, when there are none)."""
    return "|".join(sorted(names)) if names else "(?!)"


def check_config():
    """Cross-references the schema cannot express; each error names the key that is wrong."""
    problems = []
    models, datasets = config["models"], config["datasets"]
    if "judges" in config:
        problems.append("judges: renamed `llms` (one registry of LLM endpoints for judges, generation and method "
                        "roles): move each judge under `llms:` and its `prompt` into the eval entries that use it")
    generation_llm = config.get("generation", {}).get("llm")
    if generation_llm is not None:
        if generation_llm not in LLMS:
            problems.append(f"generation.llm: unknown llm {generation_llm!r}; llms: {', '.join(LLMS) or 'none'}")
        elif "model" in LLMS[generation_llm]:
            problems.append(f"llms.{generation_llm}.model: generation.llm sets how to generate; the model is each "
                            "experiment's own, so leave `model` out of this entry")
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
    for name, d in datasets.items():
        for key in ("config", "split", "revision", "token_env"):
            if key in d and "hub" not in d:
                problems.append(f"datasets.{name}.{key}: only applies to a `hub:` dataset")
        if "where" in d and name not in FILE_DATASETS:
            problems.append(f"datasets.{name}.where: only applies to `url:`, `path:` and `hub:` datasets")
    for name, e in evalsets.items():
        if e["dataset"] not in datasets:
            problems.append(f"evalsets.{name}.dataset: unknown dataset {e['dataset']!r}")
    for name, recipe in recipes.items():
        problems += recipe_problems(recipe, f"recipes.{name}")
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
        for metric, entry in x["eval"].items():
            problems += check_eval_entry(name, metric, entry)
    families = {}
    for name, x in config["experiments"].items() if not problems else []:
        for metric in x["eval"]:
            family = metric_family(name, metric)
            if families.setdefault(metric, family) != family:
                problems.append(f"experiments.{name}.eval.{metric}: metric name {metric!r} is scored by "
                                f"{family} here and by {families[metric]} elsewhere; give them different names")
    # Each method checks its own steps against its schema; options of `format: llm` name an `llms` entry.
    for name, x in config["experiments"].items():
        for k, step in enumerate(x.get("methods", [])):
            problem = step_problem(step, f"experiments.{name}.methods[{k}]", METHOD_SCHEMAS)
            if problem:
                problems.append(problem)
                continue
            for key, llm in step_llms(step).items():
                problems += llm_problems(llm, f"experiments.{name}.methods[{k}].{key}")
    for name, entry in LLMS.items():
        if entry.get("model") is None and name != generation_llm:
            problems.append(f"llms.{name}: needs `model` (a name from `models`, or the server's model name)")
    for name in config["report"]["experiments"] + [config["report"].get("baseline")]:
        if name is not None and name not in config["experiments"]:
            problems.append(f"report: unknown experiment {name!r}")
    if problems:
        raise ValueError("config.yaml: " + "; ".join(problems))


def check_eval_entry(exp, metric, entry):
    where = f"experiments.{exp}.eval.{metric}"
    if metric in ("filter", "manifest"):  # results/{exp}/filter.json and manifest.json are made by their own rules
        return [f"{where}: {metric!r} is the name of another result file; name this metric differently"]
    spec = {"evalset": entry} if isinstance(entry, str) else entry
    if spec["evalset"] not in config["evalsets"]:
        return [f"{where}: unknown evalset {spec['evalset']!r}"]
    scorer = spec.get("metric") or config["evalsets"][spec["evalset"]]["metric"]
    problems = []
    if scorer in ("judge_harmfulness", "judge_strongreject", "win_rate", "guard"):
        problems += llm_problems(spec.get("judge"), f"{where}.judge", f"{scorer} needs a judge from `llms`")
    if scorer == "win_rate" and spec.get("baseline") not in config["experiments"]:
        problems.append(f"{where}.baseline: win_rate needs a baseline experiment (got {spec.get('baseline')!r})")
    if scorer == "bbq" and "bbq" not in config["datasets"][config["evalsets"][spec["evalset"]]["dataset"]]:
        problems.append(f"{where}: bbq scoring needs an evalset whose dataset is a `bbq:` folder")
    if scorer == "toxicity" and "toxicity" not in config:
        problems.append(f"{where}: toxicity needs the top-level `toxicity` section (checkpoint or model_type)")
    return problems


def llm_problems(name, where, what="unknown llm"):
    if name in LLMS:
        return []
    return [f"{where}: {what} (got {name!r}; llms: {', '.join(LLMS) or 'none'})"]


def step_llms(step):
    """{option: llms name} for the options of a method step that name an LLM endpoint."""
    return {k: step[k] for k in llm_options(METHOD_SCHEMAS[step["method"]]) if k in step}


def llm_endpoint(name):
    """An `llms` entry as the endpoint a job opens (workflow_scripts.llm.Endpoint fields): a model from `models`
    becomes its folder; request settings (max_new_tokens, ...) stay with the entry."""
    entry = {k: v for k, v in LLMS[name].items() if k in ENDPOINT_FIELDS}
    if "model" in entry:
        entry["model"] = model_or_api(entry["model"])
    return entry


def llm_model_files(names):
    """The folders of the local models that these `llms` entries name (inputs of the jobs that load them)."""
    return [model_or_api(LLMS[n]["model"]) for n in names if LLMS[n].get("model") in config["models"]]


# scorer (evalset `metric`, or an eval entry's own `metric`) -> the rule that computes it
SCORER_RULES = {"safe_rate": "score", "over_refusal": "score", "gsm8k": "score", "rouge1": "score",
                "judge_harmfulness": "judge", "judge_strongreject": "judge", "win_rate": "judge", "guard": "judge",
                "toxicity": "toxicity",
                "bbq": "bbq_score"}


def eval_spec(exp, metric):
    """An experiment's eval entry as a dict: evalset, scorer (`metric`), and judge/baseline where they apply."""
    try:
        entry = config["experiments"][exp]["eval"][metric]
    except KeyError:
        raise ValueError(f"experiment {exp!r} has no eval.{metric} in config.yaml")
    spec = {"evalset": entry} if isinstance(entry, str) else dict(entry)
    spec.setdefault("metric", config["evalsets"][spec["evalset"]]["metric"])
    return spec


def metric_family(exp, metric):
    return SCORER_RULES[eval_spec(exp, metric)["metric"]]


check_config()
# metric names per scoring rule, for the rules' wildcard constraints (check_config made them unambiguous)
METRICS_BY_RULE = {}
for _exp, _x in config["experiments"].items():
    for _metric in _x["eval"]:
        METRICS_BY_RULE.setdefault(metric_family(_exp, _metric), set()).add(_metric)
BBQ_DATASETS = [n for n, d in config["datasets"].items() if "bbq" in d]


wildcard_constraints:
    dataset=r"[A-Za-z0-9_\-]+",
    exp=r"[A-Za-z0-9_.\-]+",
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


@functools.cache
def shared_steps():
    # Once per run, after check_config: the experiments are fixed by then (sweeps included).
    return step_owners(config["experiments"])


def method_steps(exp):
    """Paths of the experiment's method chain, in order (empty for no method). A step that several experiments
    share (same base model, training set and chain up to it) lives under the first of them: made once."""
    methods = exp_cfg(exp).get("methods", [])
    owners = shared_steps()
    return [f"data/{owners[exp, i]}/steps/{i}_{m['method']}.parquet" for i, m in enumerate(methods, 1)]


def step_input(wildcards):
    """The data a method step reads: the previous step, or the raw training set for the first."""
    i = int(wildcards.i)
    return method_steps(wildcards.exp)[i - 2] if i > 1 else raw(exp_cfg(wildcards.exp)["train"])


def step_options(wildcards):
    return exp_cfg(wildcards.exp)["methods"][int(wildcards.i) - 1]


def step_json(wildcards, replace=None):
    """The step's options (without `method`) as one JSON object for the method's `--options`, with the dict
    `replace` on top (e.g. a model name replaced by its folder); an option that names an `llms` entry becomes the
    entry itself. As one rule param it still reruns the step when any option, or a named endpoint, changes.
    (Not `**replace`: Snakemake would pass a params function input, output, threads...)"""
    step = step_options(wildcards)
    opts = {k: v for k, v in step.items() if k != "method"}
    opts.update({k: llm_endpoint(name) for k, name in step_llms(step).items()})
    return json.dumps({**opts, **(replace or {})}, sort_keys=True)


def step_llm_files(wildcards):
    """The local model folders of the `llms` entries that a method step names."""
    return llm_model_files(step_llms(step_options(wildcards)).values())


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
    return eval_spec(exp, metric)["evalset"]


def exp_evalsets(exp):
    return list(dict.fromkeys(exp_evalset(exp, m) for m in exp_cfg(exp)["eval"]))


def chain_label(exp):
    """An experiment's method chain in a few words, e.g. `preview(mode=real, m=6)`; `no method` without one."""
    parts = []
    for step in exp_cfg(exp).get("methods", []):
        opts = [f"{k}={v}" for k, v in step.items() if k != "method" and isinstance(v, (int, float, str))
                and len(str(v)) <= 12][:3]
        parts.append(f"{step['method']}({', '.join(opts)})")
    return " → ".join(parts) or "no method"


def exp_config_subtree(exp):
    """Everything that defines one experiment; its hash goes into the manifest. Models and datasets that a method
    step names in any option (a classifier model, a corpus) count too."""
    x = exp_cfg(exp)
    steps = x.get("methods", [])
    models, datasets = {}, [x.get("train")] + [config["evalsets"][e]["dataset"] for e in exp_evalsets(exp)]
    llm_models = [LLMS[n]["model"] for n in exp_llms(exp) if LLMS[n].get("model") in config["models"]]
    for name in [x["model"], *names_in_steps(steps, config["models"]), *llm_models]:
        model = models[name] = config["models"][name]
        if model["source"] == "align":
            models[model["base"]] = config["models"][model["base"]]
            datasets += model.get("data", [])
    datasets += names_in_steps(steps, config["datasets"])
    return {
        "experiment": x,
        "models": models,
        "datasets": {d: config["datasets"][d] for d in datasets if d},
        "recipe": config["recipes"].get(x.get("recipe")),
        "evalsets": {e: config["evalsets"][e] for e in exp_evalsets(exp)},
        "llms": {n: LLMS[n] for n in exp_llms(exp)},
        "seeds": exp_seeds(exp),
    }


# used by data.smk
def download_name(wildcards):
    d = config["datasets"][wildcards.dataset]
    if "hub" in d:  # rule download_hub saves the split as Parquet, its provenance beside it (hub.json)
        return f"data/download/{wildcards.dataset}/hub.parquet"
    return f"data/download/{wildcards.dataset}/{d['url'].rsplit('/', 1)[-1]}"


# used by data.smk
def hub_args(wildcards):
    d = config["datasets"][wildcards.dataset]
    args = [f"--hub {shlex.quote(d['hub'])}"]
    for key, flag in (("config", "hub-config"), ("split", "split"), ("revision", "revision"),
                      ("token_env", "token-env")):
        if key in d:
            args.append(f"--{flag} {shlex.quote(str(d[key]))}")
    return " ".join(args)


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
    if "where" in d:
        args.append(f"--where {shlex.quote(json.dumps(d['where']))}")
    return " ".join(args)


# used by generate.smk
def generation_settings():
    """`generation`, with the settings of its `llm` entry under the inline ones."""
    g = config.get("generation", {})
    if g.get("llm"):
        g = {**LLMS[g["llm"]], **{k: v for k, v in g.items() if k != "llm"}}
    return g


def generation_endpoint_args():
    g = generation_settings()
    return " ".join([
        f"--backend {g.get('backend', 'hf')}",
        f"--batch_size {g.get('batch_size', 'auto')}",
        endpoint_args({k: v for k, v in g.items() if k in ENDPOINT_FIELDS and k != "backend"}),
    ])


def evalset_generation(exp, seed, evalset):
    """One eval set's generation: prompts, output, token budget, sampling, limit and request cache."""
    e = config["evalsets"][evalset]
    spec = {"input": raw(e["dataset"]), "output": f"generations/{exp}/seed{seed}/{evalset}.parquet",
            "max_new_tokens": e.get("max_new_tokens", 256), "temperature": e.get("temperature", 0),
            "top_p": e.get("top_p", 1)}
    if "limit" in e:
        spec["limit"] = e["limit"]
    if generation_settings().get("cache"):
        # Beside the output, not declared: answers survive a failed or killed job for the rerun.
        spec["cache"] = f"cache/generations/{exp}/seed{seed}/{evalset}.sqlite"
    return spec


def generation_args(wildcards):
    spec = evalset_generation(wildcards.exp, wildcards.seed, wildcards.evalset)
    args = [generation_endpoint_args()] + [f"--{k} {spec[k]}" for k in
                                           ("max_new_tokens", "temperature", "top_p", "limit", "cache") if k in spec]
    return " ".join(args)


def generation_sets(evalsets):
    """generate_sets's --sets: the eval sets of one experiment and seed, as one quoted JSON list, with the paths
    Snakemake gives the job (its inputs and outputs are in the order of `evalsets`)."""

    def sets(wildcards, input, output):
        specs = [evalset_generation(wildcards.exp, wildcards.seed, s) for s in evalsets]
        for spec, prompts, out in zip(specs, input.prompts, output, strict=True):
            spec.update(input=prompts, output=out)
        return shlex.quote(json.dumps(specs))

    return sets


# generation.per_model_job: the experiments, grouped by the eval sets they generate, whose generation is one job per
# seed (rules/generate.smk); the rest get a job per eval set.
GENERATION_BUNDLES = {}
_bundled = config.get("generation", {}).get("per_model_job") or []
for _exp in config["experiments"]:
    if config["experiments"][_exp].get("eval") and (
        _bundled is True or any(fnmatch.fnmatchcase(_exp, pattern) for pattern in _bundled)
    ):
        GENERATION_BUNDLES.setdefault(tuple(exp_evalsets(_exp)), []).append(_exp)


def one_of(names):
    """An `exp` wildcard pattern matching exactly these names."""
    return "|".join(re.escape(n) for n in names)


def generated_one_by_one():
    """The generic generate rule's `exp` pattern: any experiment name, except where a generate_sets rule makes that
    experiment's eval set (the rest of the output path is in view of the lookahead). An eval set that a bundled
    experiment does not list (another experiment's win-rate baseline, say) still has the generic rule."""
    bundled = "|".join(f"(?:{one_of(exps)})/seed\\d+/(?:{one_of(sets)})\\.parquet$"
                       for sets, exps in GENERATION_BUNDLES.items())
    return (f"(?!{bundled})" if bundled else "") + r"[A-Za-z0-9_.\-]+"


# used by report.smk
def report_results(wildcards):
    out = []
    for exp in config["report"]["experiments"]:
        out += [f"results/{exp}/{metric}.json" for metric in exp_cfg(exp)["eval"]]
        out.append(f"results/{exp}/manifest.json")
    return out


# used by report.smk: the training jobs whose loss curves the report draws
def report_models(wildcards):
    trained = [e for e in config["report"]["experiments"] if "train" in exp_cfg(e)]
    return [f"models/{e}/seed{s}" for e in trained for s in exp_seeds(e)]


# used by score.smk
def metric_generations(wildcards):
    evalset = exp_evalset(wildcards.exp, wildcards.metric)
    return [f"generations/{wildcards.exp}/seed{s}/{evalset}.parquet" for s in exp_seeds(wildcards.exp)]


# used by score.smk
def manifest_inputs(wildcards):
    x = exp_cfg(wildcards.exp)
    seeds = exp_seeds(wildcards.exp)
    data = ["data/{exp}/train.parquet".format(**wildcards)] if "train" in x else []
    data += [raw(config["evalsets"][e]["dataset"]) for e in exp_evalsets(wildcards.exp)]
    models = [f"models/{wildcards.exp}/seed{s}" for s in seeds] if "train" in x else []
    gens = [f"generations/{wildcards.exp}/seed{s}/{e}.parquet" for s in seeds for e in exp_evalsets(wildcards.exp)]
    downloads = [f"data/download/{d}/hub.json" for d in exp_config_subtree(wildcards.exp)["datasets"]
                 if d in HUB_DATASETS]
    return {"data": data, "models": models, "generations": gens, "downloads": downloads}



def exp_llms(exp):
    """The `llms` entries an experiment uses: its judges, its method steps' roles and generation's endpoint."""
    names = {s["judge"] for s in (eval_spec(exp, m) for m in exp_cfg(exp)["eval"]) if "judge" in s}
    for step in exp_cfg(exp).get("methods", []):
        names.update(step_llms(step).values())
    if config.get("generation", {}).get("llm"):
        names.add(config["generation"]["llm"])
    return sorted(names)


def model_or_api(name):
    """A model named in config `models` is its materialised folder; anything else is an API model name."""
    return f"models/base/{name}" if name in config["models"] else name


# used by score.smk
def judge_inputs(wildcards):
    spec = eval_spec(wildcards.exp, wildcards.metric)
    files = {"generations": metric_generations(wildcards), "judge_model": llm_model_files([spec["judge"]])}
    if spec["metric"] == "win_rate":
        files["baseline"] = [f"generations/{spec['baseline']}/seed{s}/{spec['evalset']}.parquet"
                             for s in exp_seeds(spec["baseline"])]
    return files


# used by score.smk: one judge rule serves both judge scorers, each its own subcommand of the judge CLI
def judge_command(wildcards):
    scorer = eval_spec(wildcards.exp, wildcards.metric)["metric"]
    return {
        "judge_harmfulness": "harmfulness",
        "judge_strongreject": "strongreject",
        "win_rate": "winrate",
        "guard": "guard",
    }[scorer]


# used by score.smk
def judge_args(wildcards):
    spec = eval_spec(wildcards.exp, wildcards.metric)
    if spec["metric"] == "guard":  # a classifier: no prompt, no request cache; its kind is the llms entry's
        args = [endpoint_args(llm_endpoint(spec["judge"])), f"--kind {LLMS[spec['judge']].get('guard', 'llama_guard')}"]
        args += [f"--{k} {spec[k]}" for k in ("threshold", "limit") if k in spec]
        return " ".join(args)
    args = [endpoint_args(llm_endpoint(spec["judge"])), "--cache cache/judge/{exp}/{metric}.sqlite".format(**wildcards)]
    if spec["metric"] == "win_rate":
        args.append("--baseline_generations " + " ".join(judge_inputs(wildcards)["baseline"]))
    requests = {
        k: v
        for k, v in LLMS[spec["judge"]].items()
        if k in ("max_new_tokens", "batch_size", "temperature", "answer")
    }
    for key, value in {**requests, **{k: spec[k] for k in ("prompt", "limit") if k in spec}}.items():
        args.append(f"--{key} {shlex.quote(str(value))}")
    return " ".join(args)


def endpoint_args(endpoint):
    """An endpoint (llm_endpoint) as the flags of workflow_scripts.llm.add_endpoint_args."""
    args = []
    for key, value in endpoint.items():
        if value is True:
            args.append(f"--{key}")
        elif value not in (None, False):
            args.append(f"--{key} {shlex.quote(str(value))}")
    return " ".join(args)


# used by score.smk
def toxicity_files(wildcards):
    """Inputs and (checkpoint, backbone) arguments: the user's local copies, or an official release that the
    toxicity_model rule fetches into models/detoxify/{model_type}/."""
    t = config["toxicity"]
    if "checkpoint" in t:
        return {"inputs": [t["checkpoint"], t["backbone"]], "checkpoint": t["checkpoint"], "backbone": t["backbone"]}
    from workflow_scripts.toxicity import MODEL_URLS

    model_type = t.get("model_type", "original")
    folder = f"models/detoxify/{model_type}"
    return {"inputs": [folder], "checkpoint": f"{folder}/{MODEL_URLS[model_type].rsplit('/', 1)[1]}",
            "backbone": f"{folder}/{model_type}-backbone"}


# used by score.smk
def bbq_eval_set(wildcards):
    return raw(config["evalsets"][exp_evalset(wildcards.exp, wildcards.metric)]["dataset"])


# used by generate.smk, score.smk, train.smk, models.smk and realign.smk
def gpu_env(backend="hf"):
    """Conda environment for jobs that may run on a GPU; vLLM has its own (it pins older transformers)."""
    return "../envs/vllm-gpu.yaml" if backend == "vllm" else "../envs/gpu.yaml"


def judge_backend(wildcards):
    return LLMS[eval_spec(wildcards.exp, wildcards.metric)["judge"]].get("backend", "hf")


def generation_backend():
    """The backend that generates eval completions: generation.llm's entry, else generation.backend."""
    g = config.get("generation", {})
    return LLMS[g["llm"]].get("backend", "hf") if g.get("llm") else g.get("backend", "hf")


# used by every rule that may run on a GPU
def job_class(name, gpus=None):
    """The resources of one kind of job (`gpu_train`, `gpu_infer`) as the profile defines it under `job_classes`
    (profiles/slurm maps them to partitions and sizes); none on one machine. `gpus`: a job's own GPU count (a
    callable of the wildcards), used where the class asks for GPUs at all."""
    res = {key: int(value) if str(value).isdigit() else value
           for key, value in config.get("job_classes", {}).get(name, {}).items()}
    if gpus is not None and "gpu" in res:
        default = res["gpu"]
        res["gpu"] = lambda wildcards: gpus(wildcards) or default
    return res


def job_threads(name):
    """A job's threads: the CPUs its class gets on the cluster, else the config's `threads`."""
    cpus = config.get("job_classes", {}).get(name, {}).get("cpus_per_task")
    return int(cpus) if cpus else config.get("threads", 2)


def inference_class(backend):
    """An OpenAI-compatible backend only sends requests: that job needs no GPU."""
    return "cpu" if backend == "openai" else "gpu_infer"


# used by train.smk and models.smk: the one training command of the `train` and `align` rules
TRAIN_COMMAND = (
    "python -m workflow_scripts.train --base {input.base} --data {input.data} --recipe {params.recipe:q} "
    "--seed {params.seed} --threads {threads} --output {output} --checkpoint_dir {params.checkpoints} "
    "--run_name {params.run_name} > {log} 2>&1"
)


def exp_recipe(wildcards):
    return config["recipes"][exp_cfg(wildcards.exp)["recipe"]]


def align_recipe(wildcards):
    return config["recipes"][config["models"][wildcards.model]["recipe"]]


def recipe_json(recipe):
    return json.dumps(recipe, sort_keys=True)


def check_job_classes():
    """A SLURM run without job classes would send GPU jobs to the CPU partition: `--config` on the command line
    replaces the profile's `config:` block, job_classes included."""
    defaults = workflow.resource_settings.default_resources
    on_slurm = any(a.startswith("slurm_partition=") for a in (getattr(defaults, "args", None) or []))
    if on_slurm and not config.get("job_classes"):
        raise ValueError("config: `job_classes` is missing on a SLURM run. `--config` on the command line replaces "
                         "the profile's `config:` block (profiles/slurm/config.yaml); pass your keys in a "
                         "--configfile instead")


check_job_classes()


# ---------------------------------------------------------------- sweeps (used by report.smk)
SWEEPS = {name: sweep_points(name, spec) for name, spec in config.get("sweeps", {}).items()}


def labelled_chain(experiment):
    """Whether a chain mixes in an unsafe dataset and then has a step that may drop rows: its filter measures
    have a ground truth."""
    steps = experiment.get("methods", [])
    first = next((k for k, s in enumerate(steps) if s["method"] == "mix" and "unsafe" in s), None)
    return first is not None and first < len(steps) - 1


def sweep_x(name):
    """The axis a sweep's report plots along: `x`, else its first list-valued axis, else its first axis."""
    spec = config["sweeps"][name]
    lists = [a for a, v in spec["axes"].items() if isinstance(v, list)]
    return spec.get("x") or (lists[0] if lists else next(iter(spec["axes"])))


def sweep_baseline(name):
    """The line the others are compared with: `baseline`, else a point named `none` of another axis."""
    spec = config["sweeps"][name]
    if "baseline" in spec:
        return spec["baseline"]
    lines = {line_label(coords, sweep_x(name)) for _, _, coords in SWEEPS[name]}
    return "none" if "none" in lines else None


def sweep_baseline_arg(name):
    line = sweep_baseline(name)
    return f"--baseline_line {shlex.quote(line)}" if line else ""


def sweep_inputs(wildcards):
    points = SWEEPS[wildcards.sweep]
    return {
        "results": [f"results/{e}/{m}.json" for e, x, _ in points for m in x["eval"]],
        "filters": [f"results/{e}/filter.json" for e, x, _ in points if labelled_chain(x)],
    }
