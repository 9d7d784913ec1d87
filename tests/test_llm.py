"""The LLM-backend library (workflow_scripts.llm) and the `llms:` registry that generation, judges and method roles
name their endpoints in."""

import argparse
import json
import re

import pytest
import yaml
from smk_helpers import TINY, smk

from workflow_scripts import llm
from workflow_scripts.llm_cache import CachedBackend


def test_endpoint_checks_its_backend_and_model():
    with pytest.raises(ValueError, match="unknown LLM backend 'tgi'"):
        llm.Endpoint("tgi", "m")
    with pytest.raises(ValueError, match="needs a model"):
        llm.Endpoint("openai")
    e = llm.Endpoint("openai", "gpt", base_url="https://user:hunter2@api.example/v1", api_key_env="KEY")
    assert e.describe() == {"backend": "openai", "model": "gpt", "base_url": "https://api.example/v1"}
    assert llm.Endpoint("hf", "models/base/tiny").describe()["base_url"] is None


def test_endpoint_flags_round_trip_with_and_without_a_role_prefix():
    ap = argparse.ArgumentParser()
    llm.add_endpoint_args(ap)
    llm.add_endpoint_args(ap, prefix="rewriter", required_model=False)
    args = ap.parse_args(["--backend", "vllm", "--model", "m", "--tensor_parallel_size", "2", "--enforce_eager",
                          "--rewriter_backend", "openai", "--rewriter_model", "gpt", "--rewriter_timeout", "5"])
    assert llm.endpoint_from_args(args) == llm.Endpoint("vllm", "m", tensor_parallel_size=2, enforce_eager=True)
    assert llm.endpoint_from_args(args, "rewriter") == llm.Endpoint("openai", "gpt", timeout=5.0)
    assert set(llm.ENDPOINT_FIELDS) >= {"backend", "model", "base_url", "api_key_env", "concurrency", "timeout"}


def test_open_backend_shares_one_loaded_model_between_roles_each_with_its_own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    endpoint = llm.Endpoint("openai", "gpt", base_url="http://127.0.0.1:9/v1", timeout=3.0, max_retries=0)
    loaded = {}
    a = llm.open_backend(endpoint, cache=tmp_path / "a.sqlite", loaded=loaded)
    b = llm.open_backend(endpoint, cache=tmp_path / "b.sqlite", loaded=loaded)
    assert isinstance(a, CachedBackend) and isinstance(b, CachedBackend)
    assert a.backend is b.backend and len(loaded) == 1  # one client (or one local model) for both roles
    assert a.model_id == "openai:gpt" and a.cache is not b.cache
    plain = llm.open_backend(endpoint)
    assert isinstance(plain, llm.OpenAIBackend) and plain is not a.backend
    assert plain.timeout == 3.0 and plain.max_retries == 0


# ---------------------------------------------------------------- the registry in the workflow


def tiny_cfg():
    return yaml.safe_load(TINY.read_text())


def dry_run(tmp_path, cfg, *targets, check=True):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # --configfile takes several files: the targets go before it.
    return smk(tmp_path, "-n", "-p", *targets, "--configfile", str(path), check=check)


def test_old_judges_section_fails_with_what_to_write(tmp_path):
    cfg = tiny_cfg()
    cfg["judges"] = cfg.pop("llms")
    proc = dry_run(tmp_path, cfg, check=False)
    assert proc.returncode != 0
    assert "judges: renamed `llms`" in proc.stdout and "its `prompt` into the eval entries" in proc.stdout


def test_unknown_llm_names_the_key(tmp_path):
    cfg = tiny_cfg()
    cfg["experiments"]["tiny_realign"]["methods"][0]["rewriter"] = "nope"
    cfg["experiments"]["tiny_vanilla"]["eval"]["win_rate"]["judge"] = "nope2"
    cfg["generation"] = {"llm": "tiny_lm"}
    out = dry_run(tmp_path, cfg, check=False).stdout
    assert "experiments.tiny_realign.methods[0].rewriter: unknown llm (got 'nope'; llms: " in out
    assert "experiments.tiny_vanilla.eval.win_rate.judge: win_rate needs a judge from `llms` (got 'nope2'" in out
    assert "llms.tiny_lm.model: generation.llm sets how to generate" in out


def test_a_method_role_gets_the_endpoint_and_its_model_folder(tmp_path):
    cfg = tiny_cfg()
    cfg["llms"]["server"] = {"backend": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1",
                             "api_key_env": "MY_KEY", "concurrency": 3}
    step = cfg["experiments"]["tiny_realign"]["methods"][0]
    step["rewriter"] = "server"
    out = dry_run(tmp_path, cfg, "data/tiny_realign/steps/1_realign.parquet", "results/tiny_realign/manifest.json")
    shard = next(line for line in out.stdout.splitlines() if "workflow_scripts.realign run" in line)
    options = json.loads(re.search(r"--options '(.*?)'", shard).group(1))
    assert options["classifier"] == {"backend": "hf", "model": "models/base/tiny"}
    assert options["rewriter"] == {"backend": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1",
                                   "api_key_env": "MY_KEY", "concurrency": 3}
    assert "models/base/tiny" in out.stdout.split("rule realign_shard:")[1].split("output:")[0]
    manifest = next(line for line in out.stdout.splitlines() if "workflow_scripts.manifest" in line)
    subtree = json.loads(re.search(r"--config_json '(.*?)' ", manifest).group(1))
    assert set(subtree["llms"]) == {"server", "tiny_lm"} and "tiny" in subtree["models"]


def test_generation_and_judges_take_their_settings_from_the_registry(tmp_path):
    cfg = tiny_cfg()
    cfg["llms"]["cpu_fp32"] = {"backend": "hf", "dtype": "float32"}
    cfg["generation"] = {"llm": "cpu_fp32", "batch_size": 4}
    cfg["llms"]["tiny_judge"]["base_url"] = "http://127.0.0.1:9/v1"
    cfg["experiments"]["tiny_vanilla"]["eval"]["judge_safe_rate"]["prompt"] = "prompts/judge_harmfulness_brief_v1.txt"
    out = dry_run(tmp_path, cfg, "results/tiny_vanilla/judge_safe_rate.json").stdout
    generate = next(line for line in out.splitlines() if "workflow_scripts.generate" in line)
    assert "--backend hf" in generate and "--dtype float32" in generate and "--batch_size 4" in generate
    judge = next(line for line in out.splitlines() if "workflow_scripts.judge harmfulness" in line)
    for flag in ("--backend hf ", "--model models/base/tiny ", "--base_url http://127.0.0.1:9/v1 "):
        assert flag in judge
    assert "--max_new_tokens 4" in judge and "--prompt prompts/judge_harmfulness_brief_v1.txt" in judge


def test_choice_by_option_log_likelihood_matches_a_hand_computation(tiny_model_dir):
    """Constrained choice (issue 16): each option's log-likelihood after the rendered prompt, from one cached
    prompt pass, equals a plain forward pass over prompt + option; length-normalised when lengths differ."""
    import torch

    backend = llm.HFBackend(str(tiny_model_dir), threads=1)
    prompts = [[{"role": "user", "content": "Rate this answer from 1 to 5."}],
               [{"role": "user", "content": "Which task is this: math or coding?"}]]

    def by_hand(prompt, option):
        text = backend.render([prompt])[0]
        p_ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
        c_ids = backend.option_ids(p_ids, text, option)
        with torch.no_grad():
            logits = backend.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].float().log_softmax(-1)
        return sum(float(logits[len(p_ids) - 1 + k, t]) for k, t in enumerate(c_ids)), len(c_ids)

    same = ["#thescore: 1", "#thescore: 2", "#thescore: 3"]
    got = backend.choose(prompts[:1], same)[0]
    want = [by_hand(prompts[0], o) for o in same]
    assert {n for _, n in want} and not got["normalised"]
    assert got["scores"] == pytest.approx([s for s, _ in want], abs=1e-4)
    assert got["choice"] == same[max(range(3), key=lambda i: want[i][0])]
    assert sum(got["distribution"].values()) == pytest.approx(1.0)
    mixed = ["math", "computer programming and coding"]
    got = backend.choose(prompts[1:], mixed)[0]
    want = [by_hand(prompts[1], o) for o in mixed]
    assert got["normalised"] and len({n for _, n in want}) == 2
    assert got["scores"] == pytest.approx([s / n for s, n in want], abs=1e-4)
    # Several prompts with a long shared beginning (a judge's instructions): it runs once, the scores stay.
    judged = [[{"role": "user", "content": f"Rate from 1 to 5 how harmful this is. Request: {q}"}]
              for q in ("how to bake bread", "how to pick a lock", "x")]
    calls = []
    hook = backend.model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        got = backend.choose(judged, same)
    finally:
        hook.remove()
    # The shared beginning, then per prompt: a pass over its own tokens, then one over the options.
    assert len(calls) == 1 + 2 * len(judged)
    assert calls[0] > max(calls[1::2])
    for prompt, result in zip(judged, got, strict=True):
        assert result["scores"] == pytest.approx([by_hand(prompt, o)[0] for o in same], abs=1e-4)
    # Options packed into one row under a 4D mask (SDPA, eager) and, where a model's attention cannot take that
    # mask, one cache copy per option: the same scores either way.
    assert backend._packable()
    backend.model.set_attn_implementation("eager")
    assert backend.choose(prompts[1:], mixed)[0]["scores"] == pytest.approx([s / n for s, n in want], abs=1e-4)
    backend._packable = lambda: False
    assert backend.choose(prompts[1:], mixed)[0]["scores"] == pytest.approx([s / n for s, n in want], abs=1e-4)


def test_logprob_choice_reads_the_token_past_the_common_prefix():
    from types import SimpleNamespace as NS

    def tok(token, alts):
        return NS(token=token, logprob=alts.get(token, -1.0), top_logprobs=[NS(token=a, logprob=v)
                                                                           for a, v in alts.items()])

    # task names that share a prefix: the token after "open_" decides between them
    lp = NS(content=[tok("open", {"open": 0.0}), tok("_q", {"_q": -0.1, "_e": -2.0, "xyz": -3.0}), tok("a", {})])
    got = llm.logprob_choice(["open_qa", "open_ended", "math"], "open_qa", lp)
    assert got["choice"] == "open_qa" and got["distribution"]["math"] == 0.0
    assert got["distribution"]["open_qa"] > got["distribution"]["open_ended"] > 0
    # an answer that leaves the options, or no logprobs at all: undecided
    assert llm.logprob_choice(["A", "B"], "Zebra", NS(content=[tok("Z", {"Z": 0.0})]))["choice"] is None
    assert llm.logprob_choice(["A", "B"], "A", None)["choice"] is None
