"""The LLM-backend library that generation, judges and method roles share: request parameters (GenParams), three
backends behind one `generate(prompts, params)` interface (`hf`: batched transformers; `vllm`: GPU; `openai`: any
OpenAI-compatible server with bounded concurrency, timeouts and retries), an `Endpoint` that names one of them as
config's `llms:` registry does, and `open_backend`, the one place that puts the disk request cache in front.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from workflow_scripts.io import DataError

log = logging.getLogger("safeft.llm")
OnResult = Callable[[int, "str | None"], None]


@dataclass
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    # hf: "auto" sizes batches from the work and the free memory (auto_batch_size); an int forces the size.
    # Not part of the request-cache key: greedy answers do not depend on it.
    batch_size: int | str = "auto"
    seed: int = 0

    def __post_init__(self):
        self.batch_size = parse_batch_size(self.batch_size)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def parse_batch_size(value) -> int | str:
    """The batch size as given: the string "auto" or a positive int (also as text, as the CLI passes it)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size < 1 or (isinstance(value, float) and value != size):
        raise ValueError(f"batch_size must be 'auto' or a positive integer, not {value!r}")
    return size


# Auto batch size (hf backend). A decode step reads every weight once however many rows it has, so its cost grows
# far slower than the batch and the decode batch is as large as memory allows, up to AUTO_MAX_BATCH. Measured on the
# demo model (SmolLM2-135M, float32, 2 threads, AMD EPYC Zen 4): 7.5 ms per new token at batch 16, 3.5 at 64 and
# 2.8-3.4 at 128. Prompt processing (prefill) costs the same per token at any batch size (1.4-1.9 ms), so it runs
# in chunks of at most PREFILL_TOKENS padded tokens of similar-length prompts (little padding; 1024-2048 were
# fastest, 256 and 8192 about 40% slower) whose caches are joined into the one decode batch.
AUTO_MAX_BATCH = 128
AUTO_MEMORY_FRACTION = 0.5  # of the free RAM (CPU) or free device memory (GPU) that the batch may plan to use
PREFILL_TOKENS = 2048


def sequence_bytes(config, dtype_bytes: int, tokens: int) -> int:
    """Memory one sequence of `tokens` tokens (longest prompt + max_new_tokens) may hold during batched generation:
    its KV cache (keys and values of every layer, counted twice: the cache grows by concatenation and the prefill
    chunks are joined, both of which copy it), its activations (hidden states, MLP intermediates and a row of
    attention scores per token) and float32 logits over the vocabulary."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    kv_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    act_per_token = (4 * cfg.hidden_size + 3 * intermediate) * dtype_bytes + heads * tokens * 4
    return tokens * (2 * kv_per_token + act_per_token) + 2 * cfg.vocab_size * 4


def auto_batch_size(n_prompts: int, per_sequence: int, available: int, cap: int = AUTO_MAX_BATCH) -> int:
    """The decode batch for `n_prompts` prompts: as many as AUTO_MEMORY_FRACTION of `available` bytes holds (at
    least 1, at most `cap`), then evened out so that the batches are equal (130 prompts: 65 + 65, not 128 + 2)."""
    fit = max(1, min(cap, int(available * AUTO_MEMORY_FRACTION // max(per_sequence, 1))))
    batches = -(-max(n_prompts, 1) // fit)
    return -(-max(n_prompts, 1) // batches)


def _cgroup_free(proc_cgroup: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under this process's cgroup memory limit (a SLURM job's --mem), or None without one: the
    tightest limit of its cgroup and the cgroups above it, v2 (memory.max) or v1 (memory.limit_in_bytes)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    free = None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            root, limit_file, used_file = Path(mount), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit_file, used_file = Path(mount) / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        folder = root / rel.strip().lstrip("/")
        for d in (folder, *folder.parents):
            if not d.is_relative_to(root):
                break
            try:
                limit = (d / limit_file).read_text().strip()
                used = int((d / used_file).read_text())
            except (OSError, ValueError):
                continue
            if limit != "max" and int(limit) < 2 ** 60:  # v1 writes "no limit" as a number near 2**63
                left = max(0, int(limit) - used)
                free = left if free is None else min(free, left)
    return free


def available_memory(device: str) -> int:
    """Free bytes generation may plan with: free device memory on a GPU; on a CPU the available RAM, or what is
    left under the job's cgroup memory limit where that is less."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except ImportError:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_free()
    return free if limit is None else min(free, limit)


def resolve_model(path: str) -> tuple[str, str | None]:
    """(base model, adapter) for a model folder: a peft adapter folder names its own base."""
    adapter_cfg = Path(path) / "adapter_config.json"
    if adapter_cfg.exists():
        return json.loads(adapter_cfg.read_text())["base_model_name_or_path"], path
    return path, None


def continuation_ids(tokenizer, prompt_ids: list[int], prompt_text: str, option: str) -> list[int]:
    """An option's tokens as they continue the rendered prompt (tokenised together, then split, so a merge across
    the boundary is seen; separately where the joint tokens do not extend the prompt's)."""
    joint = tokenizer(prompt_text + option, add_special_tokens=False)["input_ids"]
    ids = joint[len(prompt_ids):] if joint[:len(prompt_ids)] == prompt_ids else \
        tokenizer(option, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"option {option!r} has no tokens")
    return ids


def choice_result(options: list[str], logprobs: list[float], lengths: list[int]) -> dict:
    """One constrained choice from each option's summed log-probability and token count: the scores are the sums,
    or the per-token means where the options differ in length; the distribution is their softmax."""
    normalised = len(set(lengths)) > 1
    scores = [lp / n for lp, n in zip(logprobs, lengths, strict=True)] if normalised else list(logprobs)
    top = max(scores)
    weights = [math.exp(x - top) for x in scores]
    total = sum(weights)
    best = scores.index(top)
    return {"choice": options[best], "scores": scores,
            "distribution": {o: w / total for o, w in zip(options, weights, strict=True)}, "normalised": normalised}


class HFBackend:
    """Batched transformers generation: prompts sorted by length (longest first), decode batches sized from the work
    and the free memory, prompt processing in length-sorted chunks with a shared prompt prefix (the chat template's
    system turn) computed once, greedy (each row leaving the batch when it ends) or sampled.

    Measured and not adopted, on the demo model (SmolLM2-135M), batch 64, 2 threads, on the CPU lscpu names
    "AMD EPYC" (family 25 model 17: Zen 4, 2 cores, avx512_bf16), torch 2.13 CPU, transformers 5.23:
    - a static KV cache without compilation made a decode step slower (249 vs 203 ms: attention runs over the
      whole preallocated length);
    - torch.compile (inductor, static cache): 16 new tokens took 10.0 s against 8.8 s eager, after 44 s of
      compilation; neither pays on a CPU, so the dynamic cache and eager mode stay;
    - eager attention instead of SDPA (batch 128): 500 vs 413 ms a decode step;
    - bfloat16 weights: 2.4x faster than float32 on that CPU, but 22 of 64 greedy answers (16 tokens) changed, so
      dtype "auto" stays float32 on a CPU: answers must not depend on which CPU ran them (and on AVX2-only CPUs
      bfloat16 is 1.6-5x slower). On CUDA "auto" follows hardware.resolve_dtype (bfloat16 where supported).
    """

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
        if dtype in (None, "auto"):
            if device == "cuda":
                from workflow_scripts.hardware import resolve_dtype

                torch_dtype = getattr(torch, resolve_dtype("auto", device)["dtype"])
            else:
                torch_dtype = torch.float32
        else:
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype).to(device)
        if adapter:
            from peft import PeftModel

            # Merged weights generate as fast as the base model.
            self.model = PeftModel.from_pretrained(self.model, adapter).merge_and_unload()
        self.model.eval()
        self.device = device
        self.last_batch_size: int | None = None

    def render(self, prompts: list[list[dict] | str]) -> list[str]:
        """Chat prompts through the chat template; a string is a raw-text prompt (a base model's completion)."""
        return [p if isinstance(p, str) else self.tokenizer.apply_chat_template(p, add_generation_prompt=True,
                                                                               tokenize=False) for p in prompts]

    def token_ids(self, prompts: list[list[dict] | str], texts: list[str]) -> list[list[int]]:
        """A chat template writes its own special tokens; a raw-text prompt gets the tokenizer's (e.g. BOS)."""
        return [self.tokenizer(t, add_special_tokens=isinstance(p, str))["input_ids"]
                for p, t in zip(prompts, texts, strict=True)]

    def batch_size_for(self, n_prompts: int, longest: int, params: GenParams) -> int:
        if params.batch_size != "auto":
            return params.batch_size
        per_seq = sequence_bytes(self.model.config, self.model.dtype.itemsize, longest + params.max_new_tokens)
        return auto_batch_size(n_prompts, per_seq, available_memory(self.device))

    def generate(self, prompts: list[list[dict]], params: GenParams, on_result: OnResult | None = None) -> list[str]:
        import torch

        texts = self.render(prompts)
        ids = self.token_ids(prompts, texts)
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows up at once.
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        out: list[str | None] = [None] * len(texts)
        if not order:
            return []
        size = self.last_batch_size = self.batch_size_for(len(order), len(ids[order[0]]), params)
        torch.manual_seed(params.seed)
        kwargs = {"do_sample": False} if params.greedy else {
            "do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            with torch.inference_mode():
                inputs = self._prefilled([ids[i] for i in idx])
                if params.greedy and self._plain_greedy():
                    new = self._greedy(inputs, params.max_new_tokens)
                else:
                    # generate() stops a batch once every row has ended, but computes finished rows until then.
                    gen = self.model.generate(**inputs, max_new_tokens=params.max_new_tokens,
                                              pad_token_id=self.tokenizer.pad_token_id, **kwargs)
                    new = gen[:, inputs["input_ids"].shape[1]:]
            for i, text in zip(idx, self.tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                out[i] = text
                if on_result:
                    on_result(i, text)
            print(f"generated {min(start + size, len(order))}/{len(order)} (batch size {size})", flush=True)
        return out

    def option_ids(self, prompt_ids: list[int], prompt_text: str, option: str) -> list[int]:
        return continuation_ids(self.tokenizer, prompt_ids, prompt_text, option)

    def choose(self, prompts: list[list[dict]], options: list[str]) -> list[dict]:
        """The option each prompt's answer most likely is, by the log-likelihood of the option's tokens after the
        rendered prompt, as lm-evaluation-harness scores multiple choice: summed over the option's tokens, or their
        mean where the options differ in token count. The prompt runs once; its cache is shared by all options.
        Returns per prompt {"choice", "scores" (per option), "distribution" (their softmax), "normalised"}."""
        import torch
        from transformers import DynamicCache

        out = []
        texts = self.render(prompts)
        all_ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        dev = self.device
        # The prompts' shared beginning (a judge's or classifier's instructions) runs once; every prompt goes on
        # from its cache.
        shared = min(len(os.path.commonprefix(all_ids)), min(len(i) for i in all_ids) - 1) if all_ids else 0
        prefix_kv = []
        if shared > 1 and len(all_ids) > 1 and self._prefillable():
            with torch.inference_mode():
                cache = DynamicCache()
                self.model(input_ids=torch.tensor([all_ids[0][:shared]], device=dev), past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
            prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        start = shared if prefix_kv else 0
        for text, prompt_ids in zip(texts, all_ids, strict=True):
            conts = [self.option_ids(prompt_ids, text, o) for o in options]
            n, width = len(conts), max(len(c) for c in conts)
            with torch.inference_mode():
                cache = DynamicCache(prefix_kv or None)
                last = self.model(input_ids=torch.tensor([prompt_ids[start:]], device=dev), past_key_values=cache,
                                  use_cache=True, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
                logp = torch.zeros(n, width, device=dev)
                logp[:, 0] = last[torch.tensor([c[0] for c in conts], device=dev)]
                if width > 1 and not self._packable():
                    # Every option's tokens but its last, right-padded, after n copies of the prompt's cache.
                    pad = self.tokenizer.pad_token_id
                    rows = torch.tensor([c[:-1] + [pad] * (width - len(c)) for c in conts], device=dev)
                    mask = torch.tensor([[1] * (len(c) - 1) + [0] * (width - len(c)) for c in conts], device=dev)
                    copies = DynamicCache([(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1))
                                           for layer in cache.layers])
                    positions = len(prompt_ids) + torch.arange(width - 1, device=dev).expand(n, -1)
                    logits = self.model(input_ids=rows, past_key_values=copies, position_ids=positions,
                                        attention_mask=torch.cat([mask.new_ones(n, len(prompt_ids)), mask], 1),
                                        use_cache=True).logits.float().log_softmax(-1)
                    nxt = torch.tensor([c[1:] + [0] * (width - len(c)) for c in conts], device=dev)
                    logp[:, 1:] = logits.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) * mask
                elif width > 1:
                    # Every option's tokens but its last, packed into one row after the prompt's cache: each token
                    # sees the prompt and its own option's earlier tokens (a block-diagonal causal mask). One copy
                    # of the cache per option cost ReAlign's 46 task names about 3 s a prompt on 2 CPU cores.
                    owner = torch.tensor([k for k, c in enumerate(conts) for _ in c[1:]], device=dev)
                    step = torch.tensor([j for c in conts for j in range(len(c) - 1)], device=dev)
                    seen = (owner[:, None] == owner[None, :]) & (step[:, None] >= step[None, :])
                    seen = torch.cat([seen.new_ones(len(owner), len(prompt_ids)), seen], 1)
                    # An additive mask, as eager and SDPA attention both read a ready-made 4D mask.
                    mask = torch.zeros(seen.shape, dtype=self.model.dtype, device=dev).masked_fill(
                        ~seen, torch.finfo(self.model.dtype).min)
                    logits = self.model(input_ids=torch.tensor([[t for c in conts for t in c[:-1]]], device=dev),
                                        past_key_values=cache, position_ids=(len(prompt_ids) + step)[None],
                                        attention_mask=mask[None, None], use_cache=True).logits[0]
                    nxt = torch.tensor([t for c in conts for t in c[1:]], device=dev)
                    logp[owner, step + 1] = logits.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
            out.append(choice_result(options, logp.sum(1).tolist(), [len(c) for c in conts]))
        return out

    def _packable(self) -> bool:
        """Whether choose() may score all options in one row under its own 4D mask: a ready-made 4D mask replaces
        the model's own, so it is used only with plain full attention (no sliding window or chunks: _prefillable)
        read by eager or SDPA attention (flash and flex attention do not take an additive mask)."""
        return self._prefillable() and self.model.config._attn_implementation in ("eager", "sdpa")

    def _plain_greedy(self) -> bool:
        """Whether greedy generate() here is the argmax of the logits alone (no repetition penalty, forced or
        suppressed tokens, minimum length ...), so that _greedy gives its answers."""
        if not self._prefillable():
            return False
        cfg = self.model.generation_config
        neutral = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "num_beams": 1,
                   "guidance_scale": 1.0, "num_return_sequences": 1}
        unset = ("no_repeat_ngram_size", "min_length", "min_new_tokens", "bad_words_ids", "suppress_tokens",
                 "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias",
                 "exponential_decay_length_penalty", "watermarking_config", "stop_strings", "remove_invalid_values",
                 "max_time", "custom_generate", "epsilon_cutoff", "eta_cutoff")
        return all(getattr(cfg, k, None) in (None, v) for k, v in neutral.items()) and \
            not any(getattr(cfg, k, None) for k in unset)

    def _greedy(self, inputs: dict, max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding of one prefilled batch that drops rows from it as they end; generate() computes finished
        rows until the batch's last one ends, which on the demo's eval sets (short refusals beside answers that run
        to the token limit) cost 12-17% of the generation time. It is generate()'s greedy decoding: the same argmax,
        the same positions, each row's tokens up to and including its end-of-sequence token (the demo's answers
        were identical). As with any change of batch size, a near-tie can fall the other way when the batch
        shrinks."""
        import torch
        from transformers import DynamicCache

        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        cache = inputs.get("past_key_values")
        cache = DynamicCache() if cache is None else cache
        step_ids = ids[:, cache.get_seq_length():]  # the last token, or the whole rows when nothing was prefilled
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        rows = list(range(len(ids)))  # the batch row each decoding row answers
        alive = [True] * len(ids)
        out: list[list[int]] = [[] for _ in range(len(ids))]
        for step in range(max_new_tokens):
            logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1]
            nxt = logits.argmax(-1)
            # The step's one wait for the device: the rest of the bookkeeping is on the host.
            for k, (row, token) in enumerate(zip(rows, nxt.tolist(), strict=True)):
                if alive[k]:
                    out[row].append(token)
                    alive[k] = token not in eos
            if step + 1 == max_new_tokens or not any(alive):
                break
            # Dropping rows copies the cache, about what one step's cache append costs: worth it once an eighth of
            # the batch has ended.
            if alive.count(False) * 8 >= len(alive):
                live = [k for k, a in enumerate(alive) if a]
                keep = torch.tensor(live, device=self.device)
                cache.batch_select_indices(keep)
                mask, positions, nxt = mask[keep], positions[keep], nxt[keep]
                rows, alive = [rows[k] for k in live], [True] * len(live)
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            positions = positions[:, -1:] + 1
            step_ids = nxt[:, None]
        return out

    def _prefillable(self) -> bool:
        """Whether this model's cache is the plain per-layer concatenating kind that _prefilled can join (not a
        sliding-window, hybrid or recurrent one)."""
        if not hasattr(self, "_can_prefill"):
            import inspect

            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer

            try:
                layers = DynamicCache(config=self.model.config).layers
            except Exception:  # a config the cache cannot read: use plain left-padded generation
                layers = []
            self._can_prefill = bool(layers) and all(type(layer) is DynamicLayer for layer in layers) and \
                "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self._can_prefill

    def _prefilled(self, rows: list[list[int]]) -> dict:
        """generate() inputs for one batch of token-id rows: input_ids, attention_mask and, where the model allows,
        past_key_values holding every row but its last token, so that generate() starts decoding at once.

        The rows' shared prefix (the chat template's system turn: 24 of the demo prompts' 52 tokens on average) is
        computed once; the rest is computed in chunks of similar length of at most PREFILL_TOKENS padded tokens,
        padded between the prefix and the row's own tokens, and the chunks are joined by left padding. Positions
        follow the attention mask, as generate() computes them, so the answers are those of plain left padding."""
        import torch

        pad, dev = self.tokenizer.pad_token_id, self.device

        def tensor(data, *shape):
            return torch.tensor(data, dtype=torch.long, device=dev).view(*shape)

        if not self._prefillable():
            return self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(dev)
        from transformers import DynamicCache

        # The last token of every row is left to generate(), so the prefix ends before the shortest row's last one.
        shared = min(len(os.path.commonprefix(rows)), min(len(r) for r in rows) - 1)
        prefix_kv = []
        if shared:
            cache = DynamicCache()
            self.model(input_ids=tensor([rows[0][:shared]], 1, shared), past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
            prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        chunks, start = [], 0
        while start < len(order):
            take = max(1, PREFILL_TOKENS // max(len(rows[order[start]]) - 1, 1))  # its first row is its longest
            chunks.append(order[start:start + take])
            start += take
        # Everything but the last tokens, left-padded to the longest row: ids, mask and each layer's keys and values.
        total = len(rows[order[0]]) - 1
        ids = tensor([pad] * (len(rows) * total), len(rows), total)
        mask = torch.zeros_like(ids)
        kv = None
        for chunk in chunks:
            n, at = len(chunk), tensor(chunk, -1)
            tails = [rows[i][shared:-1] for i in chunk]
            width = max(len(t) for t in tails)
            tail_ids = tensor([[pad] * (width - len(t)) + t for t in tails], n, width)
            tail_mask = tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], n, width)
            chunk_mask = torch.cat([tail_mask.new_ones(n, shared), tail_mask], 1)
            cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_kv] or None)
            if width:
                positions = (shared + tail_mask.cumsum(-1) - 1).clamp(min=0)
                self.model(input_ids=tail_ids, attention_mask=chunk_mask, position_ids=positions, past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
            used = shared + width
            if not used:
                continue
            ids[at, total - used:] = torch.cat([tensor([rows[i][:shared] for i in chunk], n, shared), tail_ids], 1)
            mask[at, total - used:] = chunk_mask
            if kv is None:
                kv = [tuple(x.new_zeros(len(rows), x.shape[1], total, x.shape[3]) for x in (layer.keys, layer.values))
                      for layer in cache.layers]
            for (keys, values), layer in zip(kv, cache.layers, strict=True):
                keys[at, :, total - used:] = layer.keys
                values[at, :, total - used:] = layer.values
            del cache
        last = tensor([r[-1] for r in rows], -1, 1)
        inputs = {"input_ids": torch.cat([ids, last], 1), "attention_mask": torch.cat([mask, torch.ones_like(last)], 1)}
        if kv is not None:
            inputs["past_key_values"] = DynamicCache(kv)
        return inputs

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
        sampling = SamplingParams(**vllm_sampling_args(params))
        if prompts and all(isinstance(p, str) for p in prompts):  # raw-text prompts: a base model's completion
            outputs = self.llm.generate(prompts, sampling, lora_request=lora)
        else:
            outputs = self.llm.chat(prompts, sampling, lora_request=lora)
        texts = [o.outputs[0].text for o in outputs]
        if on_result:
            for i, text in enumerate(texts):
                on_result(i, text)
        return texts

    def choose(self, prompts: list[list[dict]], options: list[str]) -> list[dict]:
        """HFBackend.choose on vLLM: every prompt + option as one token prompt, scored with prompt_logprobs (the
        log-probability of each prompt token; the engine's prefix cache computes the shared prompt once)."""
        from vllm import SamplingParams

        tokenizer = self.llm.get_tokenizer()
        requests, spans = [], []
        for prompt in prompts:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for option in options:
                cont = continuation_ids(tokenizer, prompt_ids, text, option)
                requests.append({"prompt_token_ids": prompt_ids + cont})
                spans.append((len(prompt_ids), cont))
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, self.adapter)
        outputs = self.llm.generate(requests, SamplingParams(max_tokens=1, prompt_logprobs=1), lora_request=lora)
        sums = [sum(out.prompt_logprobs[start + k][tok].logprob for k, tok in enumerate(cont))
                for out, (start, cont) in zip(outputs, spans, strict=True)]
        n = len(options)
        return [choice_result(options, sums[i * n:(i + 1) * n], [len(c) for _, c in spans[i * n:(i + 1) * n]])
                for i in range(len(prompts))]

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

    def _one(self, messages: list[dict], params: GenParams, stop: threading.Event, logprobs: bool = False):
        """One answer (with its token logprobs, as (text, logprobs), when `logprobs`), retried as the class says."""
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise LLMRequestError(f"{self.url}: cancelled")
            with self._count_lock:
                self.requests += 1
                self.retries += attempt > 0
            try:
                extra = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if logprobs else {}
                reply = self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=params.max_new_tokens,
                    temperature=max(params.temperature, 0.0), top_p=params.top_p, seed=params.seed, **extra)
                choices = getattr(reply, "choices", None)
                if not choices or getattr(choices[0], "message", None) is None:
                    raise MalformedReply("no choices[0].message in the reply")
                text = choices[0].message.content or ""
                return (text, getattr(choices[0], "logprobs", None)) if logprobs else text
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
        """Answers in input order. `on_result(index, answer)` is called once per item, one call at a time; for
        an answer it runs in the worker that got it, before that worker sends another request, so a callback that
        stores answers (CachedBackend) leaves at most `concurrency` of them unstored when the process is killed.
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
        one_at_a_time = threading.Lock()

        def answer(i: int, messages: list[dict]) -> str:
            text = self._one(messages, params, stop)
            if on_result:
                with one_at_a_time:
                    on_result(i, text)
            return text

        try:
            index = {pool.submit(answer, i, p): i for i, p in enumerate(prompts)}
            for finished, future in enumerate(as_completed(index), 1):
                i, err = index[future], future.exception()
                if err is None:
                    out[i] = future.result()
                elif on_error == "none" and isinstance(err, LLMRequestError) and not isinstance(err, ServerUnreachable):
                    log.warning("item %d failed: %s", i, err)
                    if on_result:
                        with one_at_a_time:
                            on_result(i, None)
                else:
                    raise err
                if finished % every == 0 or finished == len(prompts):
                    print(f"generated {finished}/{len(prompts)}", flush=True)
        except BaseException:
            stop.set()  # in-flight requests finish (bounded by the timeout); queued ones never start
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        return out


    def choose(self, prompts: list[list[dict]], options: list[str]) -> list[dict]:
        """Constrained choice through the server's logprobs: a greedy answer with its top_logprobs, read by
        `logprob_choice`, renormalised over the options found. Where the server sends no logprobs, or the answer
        leaves the options before its top tokens tell them apart, the choice is None (the caller generates and
        parses instead)."""
        params = GenParams(max_new_tokens=CHOICE_TOKENS, temperature=0.0)
        stop = threading.Event()
        with ThreadPoolExecutor(min(self.concurrency, max(len(prompts), 1))) as pool:
            replies = list(pool.map(lambda p: self._one(p, params, stop, logprobs=True), prompts))
        return [logprob_choice(options, text, lp) for text, lp in replies]


# top_logprobs asked for (OpenAI's maximum), and the answer tokens a logprobs choice may read.
TOP_LOGPROBS = 20
CHOICE_TOKENS = 48


def logprob_choice(options: list[str], text: str, logprobs) -> dict:
    """HFBackend.choose's result from one greedy answer's token logprobs (see OpenAIBackend.choose). Walking the
    answer's tokens while they still fit several options, each top alternative that fits exactly one option adds
    the probability of the path so far times its own to that option; the walk ends at the token that fits one
    option. Alternatives that fit several options are not followed (their mass is left out). Choice None when the
    logprobs cannot decide."""
    none = {"choice": None, "scores": None, "distribution": None, "normalised": False}
    tokens = getattr(logprobs, "content", None) if logprobs is not None else None
    if not tokens:
        return none

    def fitting(so_far: str) -> list[str]:
        return [o for o in options if o.startswith(so_far) or so_far.startswith(o)]

    probability: dict[str, float] = {}
    head, carry = "", 1.0
    for tok in tokens:
        for alt in tok.top_logprobs or []:
            fits = fitting(head + alt.token)
            if alt.token != tok.token and len(fits) == 1:
                probability[fits[0]] = probability.get(fits[0], 0.0) + carry * math.exp(alt.logprob)
        fits = fitting(head + tok.token)
        if len(fits) == 1:
            probability[fits[0]] = probability.get(fits[0], 0.0) + carry * math.exp(tok.logprob)
        if len(fits) <= 1:
            break
        head, carry = head + tok.token, carry * math.exp(tok.logprob)
    if not probability:
        return none
    total = sum(probability.values())
    dist = {o: probability.get(o, 0.0) / total for o in options}
    best = max(options, key=lambda o: dist[o])
    return {"choice": best, "scores": [math.log(dist[o]) if dist[o] else float("-inf") for o in options],
            "distribution": dist, "normalised": False}


BACKENDS = ("hf", "vllm", "openai")


@dataclass(frozen=True)
class Endpoint:
    """One LLM as config's `llms:` registry names it: which backend serves which model, and how to reach it.
    Fields left None take the backend's own defaults (OpenAIBackend: concurrency 8, timeout 60 s, 5 retries)."""

    backend: str = "hf"
    model: str = ""
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int | None = None
    timeout: float | None = None
    max_retries: int | None = None
    dtype: str | None = None
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown LLM backend {self.backend!r} ({', '.join(BACKENDS)})")
        if not self.model:
            raise ValueError("an LLM endpoint needs a model (a local folder or an API model name)")

    def describe(self) -> dict:
        """What a result file records about the endpoint: no key, and the URL without credentials."""
        return {"backend": self.backend, "model": self.model,
                "base_url": redact_url(self.base_url) if self.base_url else None}


ENDPOINT_FIELDS = tuple(f.name for f in fields(Endpoint))


def add_endpoint_args(parser: argparse.ArgumentParser, prefix: str = "", required_model: bool = True) -> None:
    """The CLI flags of one endpoint (`--backend`, `--model`, `--base_url`, ...); `prefix` names a role's set
    (`--classifier_backend` ...) where a stage talks to several LLMs."""
    p = f"--{prefix}_" if prefix else "--"
    parser.add_argument(f"{p}backend", default="hf", choices=BACKENDS)
    parser.add_argument(f"{p}model", required=required_model,
                        help="model folder (full weights or a peft adapter), or an API model name")
    parser.add_argument(f"{p}base_url", default=None, help="openai: the server's URL (…/v1)")
    parser.add_argument(f"{p}api_key_env", default=None,
                        help="openai: environment variable holding the API key (default OPENAI_API_KEY)")
    parser.add_argument(f"{p}concurrency", type=int, default=None, help="openai: requests in flight (default 8)")
    parser.add_argument(f"{p}timeout", type=float, default=None, help="openai: seconds per request (default 60)")
    parser.add_argument(f"{p}max_retries", type=int, default=None, help="openai: retries per request (default 5)")
    parser.add_argument(f"{p}dtype", default=None, help="hf, vllm: weight dtype; vLLM's auto runs float32 "
                        "checkpoints in bfloat16/float16; hf's auto is float32 on CPU, bfloat16 on a GPU that "
                        "supports it")
    parser.add_argument(f"{p}tensor_parallel_size", type=int, default=None,
                        help="vllm: GPUs per model (default: all the job can see)")
    parser.add_argument(f"{p}max_model_len", type=int, default=None, help="vllm: context length")
    parser.add_argument(f"{p}enforce_eager", action="store_true", help="vllm: skip compilation and CUDA graphs")


def endpoint_from_args(args: argparse.Namespace, prefix: str = "") -> Endpoint:
    p = f"{prefix}_" if prefix else ""
    return Endpoint(**{k: getattr(args, p + k) for k in ENDPOINT_FIELDS})


def visible_gpus() -> int:
    """GPUs this job can see: SLURM's GPU request decides it, so the tensor parallel size follows the rule's
    resources without a config value."""
    import torch

    return torch.cuda.device_count()


def make_backend(endpoint: Endpoint, threads: int | None = None):
    """The backend object of an endpoint (loads a local model; opens a client for a server)."""
    e = endpoint
    if e.backend == "hf":
        return HFBackend(e.model, threads=threads, dtype=e.dtype or "auto")
    if e.backend == "vllm":
        return VLLMBackend(e.model, tensor_parallel_size=e.tensor_parallel_size or max(visible_gpus(), 1),
                           max_model_len=e.max_model_len, dtype=e.dtype or "auto", enforce_eager=e.enforce_eager)
    tuning = {k: getattr(e, k) for k in ("concurrency", "timeout", "max_retries") if getattr(e, k) is not None}
    return OpenAIBackend(e.model, base_url=e.base_url, api_key_env=e.api_key_env or "OPENAI_API_KEY", **tuning)


def open_backend(endpoint: Endpoint, threads: int | None = None, cache: str | Path | None = None, loaded=None):
    """A ready backend for the endpoint, behind the disk request cache when `cache` names one. The cache key holds
    the backend name and the model's fingerprint (a local folder's file sizes and mtimes): new weights, new answers.
    `loaded` (a dict) shares one backend object between roles that name the same endpoint, each with its own cache,
    so a local model is loaded once."""
    from workflow_scripts.llm_cache import CachedBackend, model_fingerprint

    if loaded is None:
        backend = make_backend(endpoint, threads)
    else:
        if endpoint not in loaded:
            loaded[endpoint] = make_backend(endpoint, threads)
        backend = loaded[endpoint]
    if not cache:
        return backend
    return CachedBackend(backend, cache, f"{endpoint.backend}:{model_fingerprint(endpoint.model)}")


@contextmanager
def cli_errors() -> Iterator[None]:
    """For a stage's CLI: bad input (exit 2) and LLM requests that failed after their retries (exit 1) end the job
    with one line on stderr instead of a traceback."""
    try:
        yield
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except LLMRequestError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
