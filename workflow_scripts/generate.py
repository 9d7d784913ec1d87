"""One generation interface, three backends: `hf` (batched transformers generate), `vllm` (GPU) and `openai`
(any OpenAI-compatible server, with bounded concurrency, timeouts and retries). Reads a canonical eval table,
writes completions with their generation params; `--cache` answers repeated requests from a disk cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import DataError, atomic_file, read_table, sha256_text
from workflow_scripts.llm_cache import CachedBackend, model_fingerprint

log = logging.getLogger("safeft.generate")
OnResult = Callable[[int, "str | None"], None]


@dataclass
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def split_prompt(messages: list[dict]) -> tuple[list[dict], str | None]:
    """The prompt is everything before a trailing assistant turn; that turn (if any) is the reference."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def resolve_model(path: str) -> tuple[str, str | None]:
    """(base model, adapter) for a model folder: a peft adapter folder names its own base."""
    adapter_cfg = Path(path) / "adapter_config.json"
    if adapter_cfg.exists():
        return json.loads(adapter_cfg.read_text())["base_model_name_or_path"], path
    return path, None


class HFBackend:
    """Batched transformers generation: prompts sorted by length, left padding, greedy or sampled."""

    name = "hf"

    def __init__(self, model: str, threads: int | None = None, dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        base, adapter = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(adapter or base, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = torch.float32 if device == "cpu" and dtype == "auto" else dtype
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype).to(device)
        if adapter:
            from peft import PeftModel

            # Merged weights generate as fast as the base model.
            self.model = PeftModel.from_pretrained(self.model, adapter).merge_and_unload()
        self.model.eval()
        self.device = device

    def render(self, prompts: list[list[dict]]) -> list[str]:
        return [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]

    def generate(self, prompts: list[list[dict]], params: GenParams, on_result: OnResult | None = None) -> list[str]:
        import torch

        texts = self.render(prompts)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows up at once.
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out: list[str | None] = [None] * len(texts)
        torch.manual_seed(params.seed)
        for start in range(0, len(order), params.batch_size):
            idx = order[start:start + params.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.device)
            kwargs = {"do_sample": False} if params.greedy else {
                "do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            with torch.inference_mode():
                gen = self.model.generate(**batch, max_new_tokens=params.max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id, **kwargs)
            new = gen[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, self.tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                out[i] = text
                if on_result:
                    on_result(i, text)
            print(f"generated {min(start + params.batch_size, len(order))}/{len(order)}", flush=True)
        return out

    @property
    def chat_template(self) -> str:
        return self.tokenizer.chat_template or ""


def vllm_engine_args(model: str, tensor_parallel_size: int = 1, max_model_len: int | None = None,
                     seed: int = 0, dtype: str = "auto", enforce_eager: bool = False) -> dict:
    """Keyword arguments for vllm.LLM; kept separate so tests can check them without a GPU."""
    base, adapter = resolve_model(model)
    args = {"model": base, "tensor_parallel_size": tensor_parallel_size, "seed": seed, "dtype": dtype,
            "enable_lora": adapter is not None}
    if max_model_len:
        args["max_model_len"] = max_model_len
    if enforce_eager:
        # No torch.compile / CUDA graph capture: minutes of start-up that only long runs win back.
        args["enforce_eager"] = True
    if adapter:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
        # vLLM accepts only these ranks as the LoRA slot size: the smallest one that holds the adapter.
        args["max_lora_rank"] = next(x for x in (16, 32, 64, 128, 256, 320, 512) if x >= int(cfg.get("r", 16)))
    return args


def vllm_sampling_args(params: GenParams) -> dict:
    return {"max_tokens": params.max_new_tokens, "temperature": max(params.temperature, 0.0),
            "top_p": params.top_p if not params.greedy else 1.0, "seed": params.seed}


class VLLMBackend:
    """vLLM offline inference (GPU; tensor parallel size from the job's GPU count)."""

    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 dtype: str = "auto", enforce_eager: bool = False):
        from vllm import LLM

        self.args = vllm_engine_args(model, tensor_parallel_size, max_model_len, dtype=dtype,
                                     enforce_eager=enforce_eager)
        self.adapter = resolve_model(model)[1]
        self.llm = LLM(**self.args)

    def generate(self, prompts: list[list[dict]], params: GenParams, on_result: OnResult | None = None) -> list[str]:
        from vllm import SamplingParams

        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, self.adapter)
        outputs = self.llm.chat(prompts, SamplingParams(**vllm_sampling_args(params)), lora_request=lora)
        texts = [o.outputs[0].text for o in outputs]
        if on_result:
            for i, text in enumerate(texts):
                on_result(i, text)
        return texts

    @property
    def chat_template(self) -> str:
        return self.llm.get_tokenizer().chat_template or ""


class LLMRequestError(RuntimeError):
    """A request that failed for good. The message names the server URL, never a credential."""


class ServerUnreachable(LLMRequestError):
    """No connection to the server at all: not one item's fault, so raised even under on_error="none"."""


class MalformedReply(ValueError):
    pass


def redact_url(url: str) -> str:
    """The URL without user:password@, query or fragment: safe to print."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def retry_after_seconds(headers) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers.get(name)) * scale
        except (TypeError, ValueError):
            continue
    return None


class OpenAIBackend:
    """Any OpenAI-compatible chat server: `concurrency` requests in flight, each with a `timeout`, retried up to
    `max_retries` times with exponential backoff and jitter (or the server's Retry-After; waits are capped at
    `max_backoff` seconds) on 408/409/429/5xx, timeouts, connection errors and malformed bodies. The key is read
    from the environment variable `api_key_env` and never appears in messages, logs or outputs."""

    name = "openai"
    chat_template = "server-side"

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0):
        from openai import OpenAI

        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.model, self.concurrency, self.timeout = model, concurrency, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self._key = os.environ.get(api_key_env) or ""
        # Retries are ours (max_retries=0 here) so that malformed bodies are retried like 5xx answers.
        self.client = OpenAI(base_url=base_url, api_key=self._key or "EMPTY", timeout=timeout, max_retries=0)
        self.url = redact_url(str(self.client.base_url))
        self.requests = self.retries = 0
        self._count_lock = threading.Lock()

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if len(self._key) >= 4 else text

    def _classify(self, err: Exception) -> tuple[str, bool, float | None]:
        """(reason, worth retrying, server-requested delay) for a failed attempt; unknown errors propagate."""
        import openai

        if isinstance(err, openai.APITimeoutError):
            return f"no answer within {self.timeout:g} s", True, None
        if isinstance(err, openai.APIConnectionError):
            cause = err.__cause__ or err
            return f"connection failed: {type(cause).__name__}: {cause}", True, None
        if isinstance(err, openai.APIStatusError):
            code = err.status_code
            message = str(err.message).removeprefix(f"Error code: {code} - ")[:200]
            return f"HTTP {code}: {message}", code in (408, 409, 429) or code >= 500, retry_after_seconds(
                err.response.headers)
        if isinstance(err, (openai.APIResponseValidationError, ValueError)):  # JSONDecodeError is a ValueError
            return f"malformed reply: {type(err).__name__}: {str(err)[:200]}", True, None
        raise err

    def _one(self, messages: list[dict], params: GenParams, stop: threading.Event) -> str:
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise LLMRequestError(f"{self.url}: cancelled")
            with self._count_lock:
                self.requests += 1
                self.retries += attempt > 0
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=params.max_new_tokens,
                    temperature=max(params.temperature, 0.0), top_p=params.top_p, seed=params.seed)
                choices = getattr(reply, "choices", None)
                if not choices or getattr(choices[0], "message", None) is None:
                    raise MalformedReply("no choices[0].message in the reply")
                return choices[0].message.content or ""
            except Exception as err:  # classified below; anything unknown is re-raised there
                reason, retry, wait_s = self._classify(err)
            reason = self._scrub(reason)
            if not retry or attempt == self.max_retries:
                break
            # Jitter spreads out threads that failed together (one 429 burst) so they do not retry together.
            if wait_s is None:
                wait_s = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            else:
                wait_s *= random.uniform(1.0, 1.2)
            log.debug("%s: attempt %d failed (%s), retrying in %.2f s", self.url, attempt + 1, reason, wait_s)
            if stop.wait(min(wait_s, self.max_backoff)):
                raise LLMRequestError(f"{self.url}: cancelled")
        where, tries = f"{self.url}/chat/completions", f"{attempt + 1} attempt{'s' * (attempt > 0)}"
        if reason.startswith("connection failed"):
            raise ServerUnreachable(f"cannot reach {where} ({reason}) after {tries}")
        raise LLMRequestError(f"request to {where} failed after {tries}: {reason}")

    def generate(self, prompts: list[list[dict]], params: GenParams, on_result: OnResult | None = None,
                 on_error: str = "raise") -> list[str | None]:
        """Answers in input order. `on_result(index, answer)` is called in this thread as each item completes.
        on_error="raise" stops at the first item that fails for good; "none" logs it, gives it None and goes
        on (an unreachable server still raises)."""
        if on_error not in ("raise", "none"):
            raise ValueError(f"on_error must be 'raise' or 'none', not {on_error!r}")
        out: list[str | None] = [None] * len(prompts)
        if not prompts:
            return out
        stop = threading.Event()
        pool = ThreadPoolExecutor(min(self.concurrency, len(prompts)))
        every = max(1, len(prompts) // 10)
        try:
            index = {pool.submit(self._one, p, params, stop): i for i, p in enumerate(prompts)}
            for finished, future in enumerate(as_completed(index), 1):
                i, err = index[future], future.exception()
                if err is None:
                    out[i] = future.result()
                elif on_error == "none" and isinstance(err, LLMRequestError) and not isinstance(err, ServerUnreachable):
                    log.warning("item %d failed: %s", i, err)
                else:
                    raise err
                if on_result:
                    on_result(i, out[i])
                if finished % every == 0 or finished == len(prompts):
                    print(f"generated {finished}/{len(prompts)}", flush=True)
        except BaseException:
            stop.set()  # in-flight requests finish (bounded by the timeout); queued ones never start
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        return out


def visible_gpus() -> int:
    """GPUs this job can see: SLURM's GPU request decides it, so the tensor parallel size follows the rule's
    resources without a config value."""
    import torch

    return torch.cuda.device_count()


def make_backend(name: str, model: str, **opts):
    if name == "hf":
        return HFBackend(model, threads=opts.get("threads"), dtype=opts.get("dtype") or "auto")
    if name == "vllm":
        return VLLMBackend(model, tensor_parallel_size=opts.get("tensor_parallel_size") or max(visible_gpus(), 1),
                           max_model_len=opts.get("max_model_len"), dtype=opts.get("dtype") or "auto",
                           enforce_eager=bool(opts.get("enforce_eager")))
    if name == "openai":
        tuning = {k: opts[k] for k in ("concurrency", "timeout", "max_retries") if opts.get(k) is not None}
        return OpenAIBackend(model, base_url=opts.get("base_url"),
                             api_key_env=opts.get("api_key_env") or "OPENAI_API_KEY", **tuning)
    raise ValueError(f"unknown generation backend {name!r} (hf, vllm, openai)")


def generate_table(table: pa.Table, backend, params: GenParams, path: str = "<table>") -> pa.Table:
    """Completions for every row: id, prompt messages, completion, reference and the optional columns."""
    rows = table.to_pylist()
    prompts, references = [], []
    for row_no, row in enumerate(rows):
        prompt, answer = split_prompt(row["messages"])
        if not prompt or prompt[-1]["role"] != "user":
            raise DataError(path, row_no, "messages", "an eval prompt must end with a user turn")
        prompts.append(prompt)
        references.append(row.get("reference") or answer)
    completions = backend.generate(prompts, params)
    columns = {"id": [r["id"] for r in rows], "messages": prompts, "completion": completions,
               "reference": references}
    for key in ("category", "source"):
        if key in table.column_names:
            columns[key] = table.column(key).to_pylist()
    out = pa.Table.from_pydict(columns)
    meta = {"backend": backend.name, "params": asdict(params),
            "chat_template_sha256": sha256_text(backend.chat_template)}
    return out.replace_schema_metadata({"safeft": json.dumps(meta)})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="model folder (full weights or a peft adapter), or API model")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm", "openai"])
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tensor_parallel_size", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="hf, vllm: weight dtype; vLLM's auto runs float32 "
                    "checkpoints in bfloat16/float16, hf's auto is float32 on CPU")
    ap.add_argument("--enforce_eager", action="store_true", help="vllm: skip compilation and CUDA graphs")
    ap.add_argument("--base_url", default=None)
    ap.add_argument("--api_key_env", default=None, help="environment variable holding the API key (openai)")
    ap.add_argument("--concurrency", type=int, default=None, help="requests in flight (openai; default 8)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per request (openai; default 60)")
    ap.add_argument("--max_retries", type=int, default=None, help="retries per request (openai; default 5)")
    ap.add_argument("--cache", default=None, help="SQLite request cache: only requests not in it are generated")
    args = ap.parse_args(argv)
    params = GenParams(args.max_new_tokens, args.temperature, args.top_p, args.batch_size, args.seed)
    try:
        table = read_table(args.input)
        if args.limit:
            table = table.slice(0, args.limit)
        backend = make_backend(args.backend, args.model, threads=args.threads,
                               tensor_parallel_size=args.tensor_parallel_size, base_url=args.base_url,
                               api_key_env=args.api_key_env, concurrency=args.concurrency, timeout=args.timeout,
                               max_retries=args.max_retries, dtype=args.dtype, enforce_eager=args.enforce_eager)
        if args.cache:
            backend = CachedBackend(backend, args.cache, f"{args.backend}:{model_fingerprint(args.model)}")
        start = time.time()
        out = generate_table(table, backend, params, args.input)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except LLMRequestError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    with atomic_file(args.output, suffix=".parquet") as tmp:
        pq.write_table(out, tmp, compression="zstd")
    if args.cache:
        print(f"cache {args.cache}: {backend.hits} hits, {backend.misses} misses, {backend.sent} sent")
    inner = getattr(backend, "backend", backend)
    if isinstance(inner, OpenAIBackend):
        print(f"{inner.url}: {inner.requests} requests, {inner.retries} of them retries")
    print(f"done: {out.num_rows} completions in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
