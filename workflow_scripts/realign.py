"""ReAlign ("Reformatted Alignment", Fan et al. 2024): classify each training instruction into a task type,
fetch evidence for knowledge-heavy tasks, have an LLM rewrite the response into the task's format, and keep the
rewrite unless a rule rejects it. CLIs: `convert` (ReAlign JSON <-> Parquet), `split`, `run` (one shard), `merge`;
`run` takes a step's options as one JSON object (`--options`, parsed into RealignOptions) or as flags.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import string
import sys
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from workflow_scripts.io import (
    DataError,
    atomic_file,
    content_id,
    decisions_table,
    last_turn,
    merge_by_id,
    read_table,
    records_to_table,
    split_by_id,
    write_json,
    write_table,
)
from workflow_scripts.llm import BACKENDS, Endpoint, GenParams, cli_errors, open_backend, parse_batch_size
from workflow_scripts.methods import option_type, options_from_cli
from workflow_scripts.realign_retrieve import clean_snippets, make_retriever

TASKS = (
    "question_generation", "story_generation", "poem_generation", "email_generation", "data_generation",
    "advice_giving", "recommendations", "how_to_generation", "planning", "instructional_rewriting",
    "language_polishing", "paraphrasing", "text_correction", "code_correction", "code_simplification",
    "information_extraction", "keywords_extraction", "table_extraction", "title_generation", "text_summarization",
    "note_summarization", "explain_code", "explain_answer", "text_to_text_translation", "text_to_code_translation",
    "code_to_code_translation", "code_to_text_translation", "open_qa", "closed_qa", "fill_in_the_blank",
    "fact_verification", "math_puzzles", "language_learning_questions", "natural_language_learning_tutor",
    "exam_problem_solving_tutor", "ml_ai_language_model_tutor", "general_classification", "ordering",
    "sentiment_analysis", "code_language_classification", "language_classification", "topic_classification",
    "value_judgement", "rejecting", "roleplay", "default",
)
RETRIEVAL_TASKS = frozenset({"how_to_generation", "open_qa", "fact_verification", "recommendations",
                             "explain_answer"})
CRITERIA = Path(__file__).with_name("realign_criteria.yaml")
PROMPT_DIR = Path(__file__).resolve().parents[1] / "prompts"
CLASSIFY_PROMPT, REWRITE_PROMPT = "realign_classify_v1.txt", "realign_rewrite_v1.txt"
START, END = "<<<REVISED>>>", "<<<END>>>"
# Text that only appears when the rewriter echoed its prompt instead of answering.
LEAKS = (START.lower(), END.lower(), "(the revised answer)", "revised answer", "revised response",
         "original answer:", "format to follow:", "what this task is:", "### instruction:", "### response:")
_STRIP = string.punctuation.replace("_", "") + string.whitespace + "“”‘’«»"
CODE_FENCE = re.compile(r"```[\s\S]*?```")
LENGTH_FLOOR = 0.5  # a rewrite this much shorter than the original has dropped content
RETRIEVERS = ("none", "bm25", "serper")
ROLES = ("classifier", "rewriter")


@dataclass(frozen=True)
class RealignOptions:
    """A realign step's options (config.yaml, `--options` or `run`'s flags): the one home of their defaults.
    The workflow passes models and the tokenizer as folders (a name from `models` -> models/base/<name>). A role is
    an endpoint of config's `llms:` (`classifier`/`rewriter`: the workflow hands over the entry as a dict of
    workflow_scripts.llm.Endpoint fields) or its own flat options (`classifier_model`, `classifier_backend`, ...)."""

    classifier: dict | None = None
    rewriter: dict | None = None
    classifier_model: str | None = None
    rewriter_model: str | None = None
    classifier_backend: str = "openai"
    rewriter_backend: str = "openai"
    classifier_base_url: str | None = None
    classifier_api_key_env: str | None = None
    rewriter_base_url: str | None = None
    rewriter_api_key_env: str | None = None
    base_url: str | None = None  # the server for both roles unless <role>_base_url is given
    api_key_env: str | None = None
    retriever: str = "none"
    corpus: str | None = None
    corpus_field: str = "text"
    serper_url: str | None = None
    serper_key_env: str | None = None
    n: int = 2
    max_new_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    concurrency: int = 32
    timeout: float | None = None
    max_retries: int | None = None
    tokenizer: str | None = None
    classifier_answer: str = "generate"

    def __post_init__(self):
        if self.classifier_answer not in ("generate", "choice"):
            raise ValueError("realign option 'classifier_answer' must be generate or choice")
        if self.n < 1:
            raise ValueError("realign option 'n' must be >= 1")
        for role in ROLES:
            if not getattr(self, role) and not getattr(self, f"{role}_model"):
                raise ValueError(f"realign needs option {role!r} (an `llms` entry) or {role + '_model'!r}")
            if getattr(self, role) and getattr(self, f"{role}_model"):
                raise ValueError(f"realign: give {role!r} or {role + '_model'!r}, not both")


# ---------------------------------------------------------------- task criteria and prompts


def load_criteria(path: str | Path = CRITERIA) -> dict[str, dict]:
    """{task: {"description": str, "format": str | None}} for all 46 tasks; an unknown or missing task or key
    is an error naming it."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise DataError(path, None, None, "expected a mapping of task name -> {description, format}")
    unknown, missing = set(data) - set(TASKS), [t for t in TASKS if t not in data]
    if unknown or missing:
        raise DataError(path, None, None, f"unknown tasks {sorted(unknown)}, missing tasks {missing}")
    for task, spec in data.items():
        if not isinstance(spec, dict) or set(spec) != {"description", "format"}:
            raise DataError(path, None, task, "needs exactly the keys description and format")
        if spec["format"] is not None and not str(spec["format"]).strip():
            raise DataError(path, None, f"{task}.format", "empty; write null for a task without a format")
    return data


def load_prompt(name: str, prompt_dir: str | Path = PROMPT_DIR) -> str:
    return (Path(prompt_dir) / name).read_text(encoding="utf-8")


def classify_prompt(template: str, instruction: str) -> list[dict]:
    return [{"role": "user", "content": template.format(tasks="\n".join(TASKS), instruction=instruction)}]


def parse_task(answer: str | None) -> str:
    """The task an answer names, tolerating case, whitespace and punctuation around it; anything else is default."""
    name = (answer or "").strip(_STRIP).lower()
    return name if name in TASKS else "default"


def rewrite_prompt(template: str, instruction: str, response: str, task: str, spec: dict,
                   evidence: list[str]) -> list[dict]:
    notes = "\n".join(f"[{k}] {e}" for k, e in enumerate(evidence, 1)) or "(none)"
    text = template.format(task=task, description=spec["description"], format=spec["format"], evidence=notes,
                           instruction=instruction, response=response)
    return [{"role": "user", "content": text}]


def parse_rewrite(reply: str | None) -> str | None:
    """The text between the markers, or None when the reply has no complete, non-empty section."""
    if not reply or START not in reply:
        return None
    body = reply.split(START, 1)[1]
    if END not in body:
        return None
    return body.split(END, 1)[0].strip() or None


# ---------------------------------------------------------------- filter


def has_code(text: str) -> bool:
    return bool(CODE_FENCE.search(text)) or ("def " in text and "return " in text)


def select(original: str, rewrite: str, count_tokens) -> tuple[bool, str]:
    """(keep the rewrite?, reason). Rules in order: leaked prompt scaffolding, one-character answers must survive
    standalone, True/False answers keep the rewrite, code must stay code (and prose prose), and a rewrite at most
    half the original's length is rejected."""
    lower_rewrite, lower_original = rewrite.lower(), original.lower()
    if any(leak in lower_rewrite and leak not in lower_original for leak in LEAKS):
        return False, "leaked_scaffolding"
    answer = original.strip()
    if len(answer) == 1:
        found = re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", rewrite)
        return (True, "rewritten") if found else (False, "single_char_missing")
    if answer in ("True", "False"):
        return True, "rewritten"
    if has_code(original) != has_code(rewrite):
        return False, "code_mismatch"
    if count_tokens(rewrite) <= LENGTH_FLOOR * count_tokens(original):
        return False, "too_short"
    return True, "rewritten"


def token_counter(tokenizer_path: str | None = None):
    """Token count with the given tokenizer, or whitespace-separated words when there is none (said on stderr)."""
    if tokenizer_path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    print("realign: no tokenizer given; lengths are counted in whitespace-separated words", file=sys.stderr)
    return lambda text: len(text.split())


# ---------------------------------------------------------------- the stages


def extract(table: pa.Table, path: str = "<table>") -> tuple[list[str], list[str]]:
    """(instructions, responses): the last user turn and the final assistant turn of every row."""
    instructions, responses = [], []
    for row, messages in enumerate(table.column("messages").to_pylist()):
        a = len(messages) - 1
        if a < 1 or messages[a]["role"] != "assistant":
            raise DataError(path, row, "messages", "needs a final assistant turn (the response to rewrite)")
        u = last_turn(messages[:a], "user")
        if u < 0:
            raise DataError(path, row, "messages", "needs a user turn before the final assistant turn")
        instructions.append(messages[u]["content"])
        responses.append(messages[a]["content"])
    return instructions, responses


def classify(instructions: list[str], given: list[str | None], backend, template: str,
             params: GenParams, answer: str = "generate") -> tuple[list[str], list[str], list[float | None]]:
    """(task per item, how it was decided: given | classified | chosen | classify_failed, the chosen task's
    probability). A given task name is kept; the others go to the classifier in one batch. `answer: choice` on a
    local model picks each task name by log-likelihood (judge.ask), so every item gets a task."""
    tasks = [g if g in TASKS else None for g in given]
    how = ["given" if t else "classified" for t in tasks]
    probability: list[float | None] = [None] * len(tasks)
    todo = [i for i, t in enumerate(tasks) if t is None]
    prompts = [classify_prompt(template, instructions[i]) for i in todo]
    inner = getattr(backend, "backend", backend)
    if todo and answer == "choice" and hasattr(inner, "choose"):
        for i, pick in zip(todo, inner.choose(prompts, list(TASKS)), strict=True):
            if pick["choice"] is not None:  # an API server's logprobs may not decide: generated below
                tasks[i], how[i], probability[i] = pick["choice"], "chosen", pick["distribution"][pick["choice"]]
        prompts = [p for i, p in zip(todo, prompts, strict=True) if tasks[i] is None]
        todo = [i for i in todo if tasks[i] is None]
    answers = _generate(backend, prompts, params) if todo else []
    for i, reply in zip(todo, answers, strict=True):
        tasks[i] = parse_task(reply)
        if reply is None:
            how[i] = "classify_failed"
    return tasks, how, probability


def retrieve(queries: list[str | None], retriever, concurrency: int = 8) -> list[list[str]]:
    """Cleaned evidence (at most 5 snippets) per query; None queries get none."""
    def one(query):
        return clean_snippets(retriever.search(query)) if query and retriever else []

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(one, queries))


def _generate(backend, prompts: list[list[dict]], params: GenParams) -> list[str | None]:
    """Answers in order; a failed item is None (backends that report failures per item) instead of an abort."""
    if "on_error" in inspect.signature(backend.generate).parameters:
        return backend.generate(prompts, params, on_error="none")
    return backend.generate(prompts, params)  # hf, vllm: local models fail as a whole, not per item


def rewrite(prompts: list[list[dict]], backend, params: GenParams, n: int) -> list[list[str | None]]:
    """n raw rewriter replies per prompt, one request each with seeds params.seed .. params.seed + n - 1
    (distinct seeds keep a request cache from collapsing them into one); a failed request is None."""
    replies: list[list[str | None]] = [[] for _ in prompts]
    for k in range(n):
        answers = _generate(backend, prompts, replace(params, seed=params.seed + k)) if prompts else []
        for item, answer in zip(replies, answers, strict=True):
            item.append(answer)
    return replies


def longest(candidates: list[str | None], count_tokens) -> str | None:
    """The longest parsed candidate by token count (the first on ties), or None."""
    best, best_len = None, -1
    for c in candidates:
        if c is not None and (n := count_tokens(c)) > best_len:
            best, best_len = c, n
    return best


def realign_table(table: pa.Table, classifier, rewriter, *, retriever=None, criteria: dict | None = None,
                  prompt_dir: str | Path = PROMPT_DIR, n: int = 2, params: GenParams | None = None,
                  count_tokens=None, retrieve_concurrency: int = 8, path: str = "<table>",
                  classifier_answer: str = "generate"):
    """Run classify -> retrieve -> rewrite -> filter over a canonical table. Returns (table with the final
    assistant turns replaced where a rewrite was kept, decisions, counts). Every row is kept (`kept` is True);
    the decisions' `tag` says rewrite|original, `reason` why, `score` the rewrite/original token ratio."""
    criteria = criteria or load_criteria()
    params = params or GenParams(max_new_tokens=2048, temperature=0.7, top_p=1.0)
    count_tokens = count_tokens or token_counter()
    instructions, responses = extract(table, path)
    given = table.column("category").to_pylist() if "category" in table.column_names else [None] * table.num_rows
    tasks, how, task_p = classify(instructions, given, classifier, load_prompt(CLASSIFY_PROMPT, prompt_dir),
                                  GenParams(max_new_tokens=16, temperature=0.0, seed=params.seed), classifier_answer)
    todo = [i for i, t in enumerate(tasks) if criteria[t]["format"] is not None]
    queries = [instructions[i] if tasks[i] in RETRIEVAL_TASKS else None for i in todo]
    evidence = retrieve(queries, retriever, retrieve_concurrency) if retriever else [[] for _ in todo]
    template = load_prompt(REWRITE_PROMPT, prompt_dir)
    prompts = [rewrite_prompt(template, instructions[i], responses[i], tasks[i], criteria[tasks[i]], ev)
               for i, ev in zip(todo, evidence, strict=True)]
    replies = rewrite(prompts, rewriter, params, n)

    final, tags = list(responses), ["original"] * table.num_rows
    reasons, scores = ["no_format"] * table.num_rows, [None] * table.num_rows
    for i, item in zip(todo, replies, strict=True):
        best = longest([parse_rewrite(r) for r in item], count_tokens)
        if best is None:
            # Every request failed after its retries, or every reply lacked a complete marked section.
            reasons[i] = "rewrite_failed" if all(r is None for r in item) else "rewrite_unparsed"
            continue
        keep, reasons[i] = select(responses[i], best, count_tokens)
        scores[i] = count_tokens(best) / max(1, count_tokens(responses[i]))
        if keep:
            final[i], tags[i] = best, "rewrite"
    messages = table.column("messages").to_pylist()
    for row, text in zip(messages, final, strict=True):
        row[-1] = {"role": "assistant", "content": text}
    out = table.set_column(table.column_names.index("messages"), "messages",
                           pa.array(messages, type=table.schema.field("messages").type))
    ids = table.column("id").to_pylist()
    decisions = decisions_table(ids, [True] * len(ids), reasons, scores)
    decisions = decisions.append_column("tag", pa.array(tags, pa.string()))
    decisions = decisions.append_column("task", pa.array(tasks, pa.string()))
    decisions = decisions.append_column("task_source", pa.array(how, pa.string()))
    decisions = decisions.append_column("task_probability", pa.array(task_p, pa.float64()))
    counts = {"rows_in": len(ids), "rows_rewrite": tags.count("rewrite"), "rows_original": tags.count("original"),
              "reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
              "classify_failed": how.count("classify_failed"), "with_evidence": sum(1 for e in evidence if e)}
    return out, decisions, counts



# ---------------------------------------------------------------- the workflow's side (rules/methods/realign.smk)


def job_paths(step: dict, models: Collection[str], base_model: str) -> dict[str, str]:
    """The files a step's shard job reads, by option: a model named in config `models` is its folder
    models/base/<name> (else an API model name, no file), tokenizer `base` is the experiment's base model folder
    `base_model`, and a bm25 retriever reads its corpus. The job gets these paths in place of the names."""
    paths = {}
    for role in ("classifier_model", "rewriter_model"):
        if step.get(role) in models:
            paths[role] = f"models/base/{step[role]}"
    if step.get("tokenizer"):
        paths["tokenizer"] = base_model if step["tokenizer"] == "base" else step["tokenizer"]
    if step.get("retriever") == "bm25":
        paths["corpus"] = step["corpus"]
    return paths


# ---------------------------------------------------------------- sharding


def role_backend(step: dict, role: str) -> str:
    """The backend a role of a step runs on; the step's `llms` roles written out as dicts (the entries)."""
    if isinstance(step.get(role), dict):
        return step[role].get("backend", "hf")
    return step.get(f"{role}_backend", RealignOptions.__dataclass_fields__[f"{role}_backend"].default)


def runs_local_model(step: dict) -> bool:
    """Whether a step runs a role on a local model (hf or vllm backend) rather than an OpenAI-compatible server."""
    return any(role_backend(step, role) != "openai" for role in ROLES)


def merge_shards(source: pa.Table, shards: list[pa.Table], decisions: list[pa.Table],
                 path: str = "<shards>") -> tuple[pa.Table, pa.Table]:
    """One table and one decisions table in the source's order. Every source id must come back exactly once,
    and rows_in == rows tagged rewrite + rows tagged original."""
    ids = source.column("id").to_pylist()
    data = merge_by_id(ids, shards, path, "data shards")
    dec = merge_by_id(ids, decisions, path, "decisions shards")
    tags = dec.column("tag").to_pylist()
    n_rewrite, n_original = tags.count("rewrite"), tags.count("original")
    if len(ids) != n_rewrite + n_original or not all(dec.column("kept").to_pylist()):
        raise DataError(path, None, "tag", f"rows_in {len(ids)} != rewrite {n_rewrite} + original {n_original}")
    return data, dec


# ---------------------------------------------------------------- ReAlign JSON


ROLE_OF = {"human": "user", "gpt": "assistant", "system": "system"}
FROM_OF = {v: k for k, v in ROLE_OF.items()}


def from_realign(items: list, path: str = "<json>") -> pa.Table:
    """ReAlign's [{"id", "items": [{"from": human|gpt|system, "value", "category"?}, ...]}, ...] as a canonical
    table; the first `category` found becomes the row's category column."""
    if not isinstance(items, list):
        raise DataError(path, None, None, "expected a JSON list of conversations")
    records = []
    for row, obj in enumerate(items):
        if not isinstance(obj, dict) or not isinstance(obj.get("items"), list) or not obj["items"]:
            raise DataError(path, row, "items", "missing or not a non-empty list")
        messages, category = [], None
        for k, turn in enumerate(obj["items"]):
            if not isinstance(turn, dict) or turn.get("from") not in ROLE_OF:
                raise DataError(path, row, f"items[{k}].from", "must be human, gpt or system")
            if not isinstance(turn.get("value"), str):
                raise DataError(path, row, f"items[{k}].value", "missing or not a string")
            messages.append({"role": ROLE_OF[turn["from"]], "content": turn["value"]})
            category = category or turn.get("category")
        rec = {"id": str(obj["id"]) if obj.get("id") is not None else content_id(messages), "messages": messages,
               "category": category}
        records.append(rec)
    return records_to_table(records)


def to_realign(table: pa.Table, decisions: pa.Table | None = None) -> list[dict]:
    """The inverse of from_realign: category goes on the first human turn, a decimal id back to an int, and with
    decisions each item gets ReAlign's `tag` (rewrite|original)."""
    tags = dict(zip(decisions.column("id").to_pylist(), decisions.column("tag").to_pylist(), strict=True)) \
        if decisions is not None else {}
    out = []
    for rec in table.to_pylist():
        items, category = [], rec.get("category")
        for m in rec["messages"]:
            item = {"from": FROM_OF[m["role"]], "value": m["content"]}
            if category is not None and m["role"] == "user" and not any("category" in i for i in items):
                item["category"] = category
            items.append(item)
        id_ = rec["id"]
        obj = {"id": int(id_) if id_.isdecimal() and str(int(id_)) == id_ else id_, "items": items}
        if rec["id"] in tags:
            obj["tag"] = tags[rec["id"]]
        out.append(obj)
    return out


# ---------------------------------------------------------------- CLI


def role_endpoint(opts: RealignOptions, role: str) -> Endpoint:
    """The endpoint a role talks to: its `llms` entry, or its flat options (the server and key shared by both
    roles unless the role names its own)."""
    if getattr(opts, role):
        return Endpoint(**getattr(opts, role))
    return Endpoint(backend=getattr(opts, f"{role}_backend"), model=getattr(opts, f"{role}_model"),
                    base_url=getattr(opts, f"{role}_base_url") or opts.base_url,
                    api_key_env=getattr(opts, f"{role}_api_key_env") or opts.api_key_env,
                    concurrency=opts.concurrency, timeout=opts.timeout, max_retries=opts.max_retries)


def _backends(opts: RealignOptions, threads: int | None = None, cache_dir: str | None = None) -> tuple:
    """(classifier, rewriter); one backend object serves both roles when they name the same endpoint (a local
    model is loaded once), each role with its own request cache."""
    loaded = {}
    return tuple(open_backend(role_endpoint(opts, role), threads,
                              Path(cache_dir) / f"{role}.sqlite" if cache_dir else None, loaded)
                 for role in ROLES)


def cmd_run(args) -> None:
    opts = args.options
    table = read_table(args.input)
    criteria = load_criteria(args.criteria)
    classifier, rewriter = _backends(opts, args.threads, args.cache_dir)
    retriever = make_retriever(opts.retriever, opts.corpus, opts.corpus_field, opts.serper_url, opts.serper_key_env)
    params = GenParams(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                       seed=opts.seed, batch_size=args.batch_size)
    start = time.time()
    out, decisions, counts = realign_table(table, classifier, rewriter, retriever=retriever, criteria=criteria,
                                           prompt_dir=args.prompt_dir, n=opts.n, params=params,
                                           count_tokens=token_counter(opts.tokenizer), path=args.input,
                                           retrieve_concurrency=opts.concurrency,
                                           classifier_answer=opts.classifier_answer)
    write_table(out, args.output)
    write_table(decisions, args.decisions)
    counts["seconds"] = round(time.time() - start, 2)
    if args.stats:
        write_json(counts, args.stats)
    print(json.dumps(counts))


def cmd_split(args) -> None:
    for shard, path in zip(split_by_id(read_table(args.input), len(args.outputs)), args.outputs, strict=True):
        write_table(shard, path)
        print(f"{path}: {shard.num_rows} rows")


def cmd_merge(args) -> None:
    if len(args.shards) != len(args.shard_decisions):
        raise DataError(args.output, None, None, "need as many --shard_decisions as --shards")
    data, dec = merge_shards(read_table(args.input), [read_table(p) for p in args.shards],
                             [pq.read_table(p) for p in args.shard_decisions], path=args.output)
    write_table(data, args.output)
    write_table(dec, args.decisions)
    tags = dec.column("tag").to_pylist()
    print(f"merged {data.num_rows} rows: {tags.count('rewrite')} rewrite, {tags.count('original')} original")


def cmd_convert(args) -> None:
    if args.input.endswith(".json"):
        try:
            items = json.loads(Path(args.input).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(args.input, None, None, f"not JSON: {err}") from None
        write_table(from_realign(items, args.input), args.output)
    else:
        dec = pq.read_table(args.decisions) if args.decisions else None
        items = to_realign(read_table(args.input), dec)
        with atomic_file(args.output, suffix=".json") as tmp:
            tmp.write_text(json.dumps(items, indent=4, ensure_ascii=False), encoding="utf-8")
    print(f"converted {args.input} -> {args.output}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.realign", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="classify, retrieve, rewrite and filter one canonical Parquet table")
    run.add_argument("--input", required=True)
    run.add_argument("--output", required=True)
    run.add_argument("--decisions", required=True)
    run.add_argument("--stats", default=None, help="JSON file for the counts")
    run.add_argument("--threads", type=int, default=None, help="CPU threads (hf)")
    run.add_argument("--cache_dir", default=None, help="SQLite request caches (classifier/rewriter) live here")
    run.add_argument("--batch_size", type=parse_batch_size, default="auto",
                     help="hf batch size, or auto: sized from the prompts and the free memory")
    run.add_argument("--criteria", default=str(CRITERIA))
    run.add_argument("--prompt_dir", default=str(PROMPT_DIR))
    run.add_argument("--options", dest="options_json", default=None,
                     help="the step's options as one JSON object (keys as the flags below, which win over it)")
    # One flag per RealignOptions field; their defaults live there (hence SUPPRESS).
    helps = {"base_url": "server for both roles unless --<role>_base_url is given",
             "api_key_env": "env var with the API key (both roles)",
             "concurrency": "requests in flight (openai) and searches",
             "corpus": "bm25: JSONL, Parquet or text-lines corpus",
             "serper_key_env": "env var with the search API key",
             "n": "rewrites sampled per item; the longest wins",
             "tokenizer": "tokenizer for lengths (default: whitespace words)"}
    choices = {"classifier_backend": BACKENDS, "rewriter_backend": BACKENDS, "retriever": RETRIEVERS}
    for f in fields(RealignOptions):
        default = f"(default {f.default})" if f.default not in (None, MISSING) else None
        text = " ".join(filter(None, [helps.get(f.name), default]))
        kind = option_type(RealignOptions, f.name)
        run.add_argument(f"--{f.name}", type=json.loads if kind is dict else kind, choices=choices.get(f.name),
                         default=argparse.SUPPRESS, help=text or None)
    split = sub.add_parser("split", help="canonical Parquet -> N shards by id hash")
    split.add_argument("--input", required=True)
    split.add_argument("--outputs", nargs="+", required=True)
    merge = sub.add_parser("merge", help="shards -> one table + one decisions table in the input's order")
    merge.add_argument("--input", required=True, help="the table that was split (for order and row count)")
    merge.add_argument("--shards", nargs="+", required=True)
    merge.add_argument("--shard_decisions", nargs="+", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--decisions", required=True)
    conv = sub.add_parser("convert", help="ReAlign JSON (.json) <-> canonical Parquet")
    conv.add_argument("--input", required=True)
    conv.add_argument("--output", required=True)
    conv.add_argument("--decisions", default=None, help="Parquet -> JSON: add each item's tag from here")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        flags = {f.name: getattr(args, f.name) for f in fields(RealignOptions) if hasattr(args, f.name)}
        try:
            args.options = options_from_cli(RealignOptions, "realign", args.options_json, flags)
        except ValueError as err:
            ap.error(str(err))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli_errors():
        {"run": cmd_run, "split": cmd_split, "merge": cmd_merge, "convert": cmd_convert}[args.cmd](args)


if __name__ == "__main__":
    main()
