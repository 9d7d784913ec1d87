"""The hf backend's batching: batch size "auto" bounded by the memory estimate, longest-first order, the shared
prefix and chunked prompt processing giving the answers of one-at-a-time generation, early stop of a finished
batch, and the --batch_size option."""

import json

import pyarrow.parquet as pq
import pytest

from workflow_scripts import generate, llm
from workflow_scripts.io import records_to_table, write_table

MIB = 2 ** 20


def conv(q):
    return [{"role": "user", "content": q}]


PROMPTS = [conv("short"), conv("a much longer prompt with many more words in it than the first"),
           conv("medium length prompt here"), conv("x")] + [conv(f"q {i} " * (i % 7)) for i in range(16)]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    """The tiny Llama with larger random weights: its greedy answers then differ from prompt to prompt (the
    saved initialisation answers every prompt with the same newlines, which would prove nothing)."""
    import torch

    b = llm.HFBackend(str(tiny_model_dir), threads=1)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    return b


def plain_generate(backend, prompt, max_new_tokens):
    """One prompt through model.generate with no padding, batching or cache tricks: the reference answer."""
    import torch

    enc = backend.tokenizer(backend.render([prompt]), return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        gen = backend.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=backend.tokenizer.pad_token_id)
    return backend.tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_auto_batch_size_from_memory():
    # All prompts of a short set in one batch when memory allows; the cap splits larger sets into equal batches.
    assert llm.auto_batch_size(40, MIB, 64 * 2 ** 30) == 40
    assert llm.auto_batch_size(200, MIB, 64 * 2 ** 30) == 100
    assert llm.auto_batch_size(300, MIB, 64 * 2 ** 30, cap=128) == 100
    # Memory bounds it: 100 MiB free, half of it planned, 10 MiB a sequence: 5 at most, evened out to 4 x 4.
    assert llm.auto_batch_size(16, 10 * MIB, 100 * MIB) == 4
    assert llm.auto_batch_size(16, 10 * MIB, 1 * MIB) == 1
    assert llm.auto_batch_size(0, MIB, 2 ** 30) == 1


def test_sequence_bytes_follows_the_config(tiny_model_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    small, large = (llm.sequence_bytes(cfg, 4, t) for t in (10, 100))
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert large > 10 * small - 10 * 2 * cfg.vocab_size * 4  # at least linear in the tokens
    assert small >= 10 * 2 * kv_per_token * 4 + 2 * cfg.vocab_size * 4
    assert llm.sequence_bytes(cfg, 2, 100) < large  # bfloat16 holds less than float32


def test_auto_batches_shrink_with_available_memory(backend, monkeypatch):
    params = llm.GenParams(max_new_tokens=4)
    assert params.batch_size == "auto"
    monkeypatch.setattr(llm, "available_memory", lambda device: 64 * 2 ** 30)
    backend.generate(PROMPTS, params)
    assert backend.last_batch_size == len(PROMPTS)
    longest = max(len(ids) for ids in backend.tokenizer(backend.render(PROMPTS))["input_ids"])
    per_seq = llm.sequence_bytes(backend.model.config, 4, longest + params.max_new_tokens)
    monkeypatch.setattr(llm, "available_memory", lambda device: int(per_seq * 6.5 / llm.AUTO_MEMORY_FRACTION))
    backend.generate(PROMPTS, params)
    assert backend.last_batch_size == 5  # 6 fit; 20 prompts as 4 batches of 5
    backend.generate(PROMPTS, llm.GenParams(max_new_tokens=4, batch_size=7))
    assert backend.last_batch_size == 7  # an int forces the size


def test_longest_first_order_and_answers_in_input_order(backend, monkeypatch):
    seen = []
    real = backend._prefilled
    monkeypatch.setattr(backend, "_prefilled", lambda rows: seen.append([len(r) for r in rows]) or real(rows))
    monkeypatch.setattr(llm, "available_memory", lambda device: 64 * 2 ** 30)
    got = {}
    out = backend.generate(PROMPTS, llm.GenParams(max_new_tokens=3, batch_size=6),
                           on_result=lambda i, text: got.setdefault(i, text))
    lengths = [n for batch in seen for n in batch]
    assert [len(b) for b in seen] == [6, 6, 6, 2]
    assert lengths == sorted(lengths, reverse=True)
    assert got == dict(enumerate(out))
    assert out[3] == backend.generate([PROMPTS[3]], llm.GenParams(max_new_tokens=3, batch_size=1))[0]


def test_auto_batching_gives_one_at_a_time_greedy_answers(backend, monkeypatch):
    params = llm.GenParams(max_new_tokens=8)
    auto = backend.generate(PROMPTS, params)
    assert len(set(auto)) > len(PROMPTS) // 2  # answers that differ, so that the comparison means something
    single = backend.generate(PROMPTS, llm.GenParams(max_new_tokens=8, batch_size=1))
    assert auto == single
    assert auto == [plain_generate(backend, p, 8) for p in PROMPTS]
    # Many small prefill chunks, and the plain left-padded path for models whose cache cannot be joined.
    monkeypatch.setattr(llm, "PREFILL_TOKENS", 40)
    assert backend.generate(PROMPTS, params) == auto
    monkeypatch.setattr(backend, "_can_prefill", False)
    assert backend.generate(PROMPTS, params) == auto


def test_prefilled_inputs_share_the_prefix_and_leave_the_last_token(backend, monkeypatch):
    rows = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11], [5, 6, 7, 12, 13]]
    pad = backend.tokenizer.pad_token_id
    # One chunk: the shared prefix, then each row's own tokens left-padded, then its last token.
    inputs = backend._prefilled(rows)
    ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
    assert ids == [rows[0], [5, 6, 7, pad, pad, 11], [5, 6, 7, pad, 12, 13]]
    assert mask == [[1] * 6, [1, 1, 1, 0, 0, 1], [1, 1, 1, 0, 1, 1]]
    keys = inputs["past_key_values"].layers[0].keys
    assert keys.shape[0] == 3 and keys.shape[2] == 5  # all but the last column
    # A chunk per row: chunks are joined by left padding.
    monkeypatch.setattr(llm, "PREFILL_TOKENS", 1)
    inputs = backend._prefilled(rows)
    assert inputs["input_ids"].tolist() == [rows[0], [pad, pad, 5, 6, 7, 11], [pad, 5, 6, 7, 12, 13]]
    assert inputs["attention_mask"].tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert backend._prefilled([[4]])["input_ids"].tolist() == [[4]]  # nothing to cache


def test_a_batch_stops_when_every_answer_has_ended(backend, monkeypatch):
    import torch

    prompts = PROMPTS[:6]
    params = llm.GenParams(max_new_tokens=20)
    ids = backend.tokenizer(backend.render(prompts), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        inputs = backend._prefilled(ids)
        first = backend.model.generate(**inputs, max_new_tokens=1, do_sample=False,
                                       pad_token_id=backend.tokenizer.pad_token_id)[:, -1].tolist()
    calls = []
    hook = backend.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        backend.generate(prompts, params)
        assert len(calls) > 20  # prefix + chunk + 20 steps
        calls.clear()
        # Every prompt's first answer token ends it: one decode step, not 20.
        monkeypatch.setattr(backend.model.generation_config, "eos_token_id", sorted(set(first)))
        backend.generate(prompts, params)
        assert len(calls) == 3  # the shared prefix, one prompt chunk, one step
    finally:
        hook.remove()


def test_finished_rows_leave_the_batch_and_answers_stay_those_of_generate(backend, monkeypatch):
    # An end-of-sequence token that some answers produce early and most never do: the batch must shrink.
    import torch

    early = {}
    for prompt in PROMPTS:
        enc = backend.tokenizer(backend.render([prompt]), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            gen = backend.model.generate(**enc, max_new_tokens=3, do_sample=False,
                                         pad_token_id=backend.tokenizer.pad_token_id)
        for token in set(gen[0, enc["input_ids"].shape[1]:].tolist()):
            early[token] = early.get(token, 0) + 1
    eos = max((t for t, c in early.items() if c <= len(PROMPTS) // 2), key=lambda t: early[t])
    assert early[eos] >= len(PROMPTS) // 4
    monkeypatch.setattr(backend.model.generation_config, "eos_token_id", eos)
    expected = [plain_generate(backend, p, 10) for p in PROMPTS]
    shapes = []
    hook = backend.model.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        assert backend._plain_greedy()
        got = backend.generate(PROMPTS, llm.GenParams(max_new_tokens=10))
    finally:
        hook.remove()
    decode_rows = [rows for rows, width in shapes if width == 1]
    assert decode_rows[0] == len(PROMPTS) and decode_rows[-1] < len(PROMPTS)
    assert decode_rows == sorted(decode_rows, reverse=True)
    assert got == expected
    # A generation config with a logits processor (here a repetition penalty) goes through generate() itself.
    monkeypatch.setattr(backend.model.generation_config, "repetition_penalty", 1.3)
    assert not backend._plain_greedy()
    assert backend.generate(PROMPTS[:3], llm.GenParams(max_new_tokens=4)) == \
        [plain_generate(backend, p, 4) for p in PROMPTS[:3]]


def test_batch_size_values_and_cli(tiny_model_dir, tmp_path):
    assert llm.parse_batch_size("auto") == llm.parse_batch_size("AUTO") == "auto"
    assert llm.parse_batch_size("8") == llm.parse_batch_size(8) == 8
    for bad in ("0", "-2", "x", 1.5, True, None):
        with pytest.raises(ValueError):
            llm.parse_batch_size(bad)
    assert llm.GenParams(batch_size="4").batch_size == 4
    with pytest.raises(ValueError):
        llm.GenParams(batch_size=0)

    evals = tmp_path / "eval.parquet"
    write_table(records_to_table([{"id": f"e{i}", "messages": conv(f"q{i}")} for i in range(3)]), evals)
    for value in ("auto", "2"):
        out = tmp_path / f"gens_{value}.parquet"
        generate.main(["--model", str(tiny_model_dir), "--input", str(evals), "--output", str(out),
                       "--max_new_tokens", "2", "--batch_size", value])
        meta = json.loads(pq.read_table(out).schema.metadata[b"safeft"])
        assert meta["params"]["batch_size"] == llm.parse_batch_size(value)
    with pytest.raises(SystemExit):
        generate.main(["--model", "m", "--input", "i", "--output", "o", "--batch_size", "0"])


def test_several_eval_sets_in_one_process_match_one_job_each(tiny_model_dir, tmp_path, monkeypatch):
    loads = []
    real = llm.make_backend
    monkeypatch.setattr(llm, "make_backend", lambda *a, **k: loads.append(1) or real(*a, **k))
    sets = []
    for name, n, tokens in (("a", 3, 2), ("b", 4, 3)):
        path = tmp_path / f"{name}.parquet"
        write_table(records_to_table([{"id": f"{name}{i}", "messages": conv(f"{name} q{i}")} for i in range(n)]),
                    path)
        sets.append({"input": str(path), "output": str(tmp_path / f"{name}_one.parquet"), "max_new_tokens": tokens})
        generate.main(["--model", str(tiny_model_dir), "--input", str(path), "--max_new_tokens", str(tokens),
                       "--output", str(tmp_path / f"{name}_single.parquet")])
    sets[1]["limit"] = 2
    sets[1]["cache"] = str(tmp_path / "b.sqlite")
    loads.clear()
    generate.main(["--model", str(tiny_model_dir), "--sets", json.dumps(sets)])
    assert len(loads) == 1  # one model for both sets
    for name, rows in (("a", 3), ("b", 2)):
        one = pq.read_table(tmp_path / f"{name}_one.parquet")
        single = pq.read_table(tmp_path / f"{name}_single.parquet")
        assert one.num_rows == rows
        assert one.to_pylist() == single.slice(0, rows).to_pylist()
        assert json.loads(one.schema.metadata[b"safeft"])["params"] == \
            json.loads(single.schema.metadata[b"safeft"])["params"]
    assert (tmp_path / "b.sqlite").exists()
    for bad in (["--sets", "[]"], ["--sets", "{"], ["--sets", '[{"input": "x"}]'],
                ["--sets", '[{"input": "x", "output": "y", "max_tokens": 3}]'],
                ["--sets", json.dumps(sets), "--input", "x"], ["--input", "x"]):
        with pytest.raises(SystemExit):
            generate.main(["--model", "m", *bad])


def test_cgroup_memory_limit(tmp_path):
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text(f"{8 * 2 ** 30}\n")
    (v2 / "job" / "memory.current").write_text(f"{2 ** 30}\n")
    (v2 / "job" / "step" / "memory.max").write_text("max\n")
    (v2 / "job" / "step" / "memory.current").write_text("0\n")
    proc.write_text("0::/job/step\n")
    assert llm._cgroup_free(str(proc), str(v2)) == 7 * 2 ** 30
    v1 = tmp_path / "v1"
    (v1 / "memory" / "slurm").mkdir(parents=True)
    (v1 / "memory" / "slurm" / "memory.limit_in_bytes").write_text(f"{4 * 2 ** 30}\n")
    (v1 / "memory" / "slurm" / "memory.usage_in_bytes").write_text(f"{3 * 2 ** 30}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1\n")
    proc.write_text("4:memory:/slurm\n1:cpu:/\n")
    assert llm._cgroup_free(str(proc), str(v1)) == 2 ** 30
    proc.write_text("1:cpu:/\n")
    assert llm._cgroup_free(str(proc), str(v1)) is None
    assert llm._cgroup_free(str(tmp_path / "missing")) is None
    assert llm.available_memory("cpu") > 0
