"""One generation interface, three backends: `hf` (batched transformers generate), `vllm` (GPU) and `openai`
(any OpenAI-compatible server). Reads a canonical eval table, writes completions with their generation params.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import DataError, atomic_file, read_table, sha256_text


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

    def generate(self, prompts: list[list[dict]], params: GenParams) -> list[str]:
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
            print(f"generated {min(start + params.batch_size, len(order))}/{len(order)}", flush=True)
        return out

    @property
    def chat_template(self) -> str:
        return self.tokenizer.chat_template or ""


def vllm_engine_args(model: str, tensor_parallel_size: int = 1, max_model_len: int | None = None,
                     seed: int = 0, dtype: str = "auto") -> dict:
    """Keyword arguments for vllm.LLM; kept separate so tests can check them without a GPU."""
    base, adapter = resolve_model(model)
    args = {"model": base, "tensor_parallel_size": tensor_parallel_size, "seed": seed, "dtype": dtype,
            "enable_lora": adapter is not None}
    if max_model_len:
        args["max_model_len"] = max_model_len
    if adapter:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
        args["max_lora_rank"] = max(16, int(cfg.get("r", 16)))
    return args


def vllm_sampling_args(params: GenParams) -> dict:
    return {"max_tokens": params.max_new_tokens, "temperature": max(params.temperature, 0.0),
            "top_p": params.top_p if not params.greedy else 1.0, "seed": params.seed}


class VLLMBackend:
    """vLLM offline inference (GPU; tensor parallel size from the job's GPU count)."""

    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, max_model_len: int | None = None):
        from vllm import LLM

        self.args = vllm_engine_args(model, tensor_parallel_size, max_model_len)
        self.adapter = resolve_model(model)[1]
        self.llm = LLM(**self.args)

    def generate(self, prompts: list[list[dict]], params: GenParams) -> list[str]:
        from vllm import SamplingParams

        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, self.adapter)
        outputs = self.llm.chat(prompts, SamplingParams(**vllm_sampling_args(params)), lora_request=lora)
        return [o.outputs[0].text for o in outputs]

    @property
    def chat_template(self) -> str:
        return self.llm.get_tokenizer().chat_template or ""


class OpenAIBackend:
    """Any OpenAI-compatible chat server; the key is read from an environment variable, never logged."""

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5):
        from openai import OpenAI

        self.model = model
        self.concurrency = concurrency
        # The client retries 429/5xx with exponential backoff itself.
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env, "EMPTY"),
                             timeout=timeout, max_retries=max_retries)

    def _one(self, messages: list[dict], params: GenParams) -> str:
        reply = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=params.max_new_tokens,
            temperature=max(params.temperature, 0.0), top_p=params.top_p, seed=params.seed)
        return reply.choices[0].message.content or ""

    def generate(self, prompts: list[list[dict]], params: GenParams) -> list[str]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda p: self._one(p, params), prompts))

    chat_template = "server-side"


def make_backend(name: str, model: str, **opts):
    if name == "hf":
        return HFBackend(model, threads=opts.get("threads"))
    if name == "vllm":
        return VLLMBackend(model, tensor_parallel_size=opts.get("tensor_parallel_size") or 1,
                           max_model_len=opts.get("max_model_len"))
    if name == "openai":
        return OpenAIBackend(model, base_url=opts.get("base_url"),
                             api_key_env=opts.get("api_key_env") or "OPENAI_API_KEY")
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
    ap.add_argument("--base_url", default=None)
    ap.add_argument("--api_key_env", default=None)
    args = ap.parse_args(argv)
    params = GenParams(args.max_new_tokens, args.temperature, args.top_p, args.batch_size, args.seed)
    try:
        table = read_table(args.input)
        if args.limit:
            table = table.slice(0, args.limit)
        backend = make_backend(args.backend, args.model, threads=args.threads,
                               tensor_parallel_size=args.tensor_parallel_size, base_url=args.base_url,
                               api_key_env=args.api_key_env)
        start = time.time()
        out = generate_table(table, backend, params, args.input)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with atomic_file(args.output, suffix=".parquet") as tmp:
        pq.write_table(out, tmp, compression="zstd")
    print(f"done: {out.num_rows} completions in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
