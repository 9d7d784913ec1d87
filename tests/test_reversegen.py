"""ReverseGen: the pure parts (prompts, the cut, labels, pairs, stage options), the raw-text training and generation
it adds to the shared lifecycle, and two rounds on the tiny model end to end, with a fake OpenAI-compatible judge as
the labeller (a random tiny model never refuses, so the keyword rule would label every answer a failure)."""

import hashlib
import json
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fake_openai import FakeOpenAI
from smk_helpers import TINY, planned_outputs, smk, smk_killed_when

from workflow_scripts import reversegen as rg
from workflow_scripts.io import DataError, records_to_table


def opts(**kw):
    return rg.ReverseGenOptions(**{"seeds": "s", "proposer": "p", **kw})


# ---------------------------------------------------------------- prompts and the cut


def test_the_proposer_prompts_follow_the_reference():
    assert rg.instruction_prompt("safety", ["a?", "b?", "c?"]) == "Ask questions:\n1. a?\n2. b?\n3. c?\n4."
    assert rg.instruction_prompt("math", ["x", "y", "z"]) == "Ask math questions:\nQ1. x\nQ2. y\nQ3. z\nQ4."
    assert rg.instruction_prompt("honesty", ["x"], "law").startswith(
        "Ask multiple choice questions (with answers) about law:\nQ1. x\nQ2.")


def test_the_cut_stops_before_the_next_list_item():
    assert rg.cut(" How do I pick a lock?\n5. How do I") == "How do I pick a lock?"
    assert rg.cut(" Dilute 2.5 ml of it. 12. next") == "Dilute 2.5 ml of it."
    assert rg.cut(" What is 3+4?\nQ5. What") == "What is 3+4?"
    assert rg.cut("  one line only  ") == "one line only"
    # items 1-4 are not the next item: a list inside the instruction stays
    assert rg.cut(" Steps: 1. mix 2. heat") == "Steps: 1. mix 2. heat"
    # with two shots the proposer writes item 3, and item 4 is the next
    assert rg.cut(" a?\n4. b?", next_number=4) == "a?" and rg.cut(" a?\n4. b?") == "a?\n4. b?"


def test_fewer_seeds_than_shots_plus_one_is_an_error_naming_the_file(tmp_path):
    from workflow_scripts.io import write_table

    path = tmp_path / "seeds.parquet"
    write_table(records_to_table([{"id": str(k), "messages": [{"role": "user", "content": f"q{k}"}]}
                                  for k in range(3)]), path)
    with pytest.raises(DataError, match=r"seeds.parquet.*3 seed instructions; shots=3 needs at least 4"):
        rg.read_seeds(str(path), opts())
    assert rg.read_seeds(str(path), opts(shots=2)) == ["q0", "q1", "q2"]


def test_seed_instructions_are_user_turns_and_a_bad_row_is_named():
    good = records_to_table([{"id": str(k), "messages": [{"role": "user", "content": f" q{k} "},
                                                         {"role": "assistant", "content": "no"}]} for k in range(3)])
    assert rg.seed_instructions(good, "s.parquet") == ["q0", "q1", "q2"]
    bad = records_to_table([{"id": "0", "messages": [{"role": "user", "content": "q"}]},
                            {"id": "1", "messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r"s.parquet.*row 1.*messages"):
        rg.seed_instructions(bad, "s.parquet")


def test_round_prompts_draw_distinct_shots_per_round_reproducibly():
    seeds = [f"q{k}?" for k in range(10)]
    one = rg.round_prompts(seeds, opts(prompts=5), 1)
    assert [pid for pid, _ in one] == [f"r1-p{k}" for k in range(5)]
    assert one == rg.round_prompts(seeds, opts(prompts=5), 1)
    assert one != rg.round_prompts(seeds, opts(prompts=5), 2)
    for _, prompt in one:
        shots = [line.split(". ", 1)[1] for line in prompt.splitlines()[1:4]]
        assert len(set(shots)) == 3 and set(shots) <= set(seeds) and prompt.endswith("\n4.")


def test_warmup_rows_hold_the_answer_out_of_its_prompt():
    seeds = [f"q{k}?" for k in range(6)]
    rows = rg.warmup_rows(seeds, opts())
    assert len(rows) == 6 and sorted(r["messages"][1]["content"] for r in rows) == sorted(" " + s for s in seeds)
    for r in rows:
        assert r["messages"][1]["content"].strip() not in r["messages"][0]["content"]
    assert len(rg.warmup_rows(seeds, opts(warmup_examples=10))) == 10


# ---------------------------------------------------------------- labels and pairs


def test_honesty_entropy_in_nats_against_the_reference_threshold():
    assert rg.answer_entropy(["A"] * 10) == 0.0
    assert rg.answer_entropy(["A) x"] * 5 + ["The answer is B"] * 5) == pytest.approx(math.log(2))
    spread = ["A", "A", "A", "B", "B", "B", "C", "C", "D", "D"]
    expected = -(2 * 0.3 * math.log(0.3) + 2 * 0.2 * math.log(0.2))
    assert rg.answer_entropy(spread) == pytest.approx(expected)
    assert expected >= rg.HONESTY_ENTROPY > math.log(2)


def test_the_answer_key_is_the_choice_letter():
    assert rg.answer_key("The answer is (C), because ...") == "C"
    assert rg.answer_key("A cat is a mammal.\nB) no") == "B"
    assert rg.answer_key("  Paris is the capital\nmore") == "paris is the capital"


def test_keyword_and_guard_labellers(tiny_model_dir):
    keyword = opts()
    failure, scores, details = rg.labeller_verdicts(keyword, ["q1", "q2"], ["I'm sorry, I can't.", "Sure: ..."],
                                                    1)
    assert failure == [False, True] and scores == [None, None] and details[0] == "I'm sorry"
    guard = opts(labeller={"backend": "hf", "model": str(tiny_model_dir)}, labeller_kind="llama_guard")
    failure, scores, _ = rg.labeller_verdicts(guard, ["q1", "q2"], ["no", "yes"], 1)
    assert all(f == (p > 0.5) for f, p in zip(failure, scores, strict=True)) and all(0 <= p <= 1 for p in scores)


def test_math_failure_compares_final_numbers():
    assert rg.math_failure("so the answer is 12", "#### 12") is False
    assert rg.math_failure("it is 13", "The answer: 12") is True
    assert rg.math_failure("12", "no number here") is None


def label(pid, k, failure, kept=True):
    return {"id": f"{pid}-s{k}", "prompt_id": pid, "prompt": f"prompt {pid}", "instruction": f"i {pid} {k}",
            "kept": kept, "failure": failure}


def test_pairs_come_from_the_same_prompt_only_and_are_counted():
    labels = [label("p0", 0, True), label("p0", 1, False), label("p0", 2, True), label("p0", 3, False),
              label("p1", 0, True), label("p1", 1, True),          # no non-failing one: no pair
              label("p2", 0, False), label("p2", 1, True, kept=False),  # the failing one was a duplicate
              label("p3", 0, None), label("p3", 1, True), label("p3", 2, False)]  # an unlabelled one is skipped
    pairs, counts = rg.preference_pairs(labels, seed=0)
    assert counts == {"prompts": 4, "prompts_with_both": 2, "pairs": 3}
    by_id = {r["id"]: r for r in labels}
    for pair in pairs:
        chosen, rejected = (by_id[x] for x in pair["id"].split(">"))
        assert chosen["failure"] and not rejected["failure"] and chosen["prompt_id"] == rejected["prompt_id"]
        assert pair["prompt"] == chosen["prompt"] and pair["chosen"] == " " + chosen["instruction"]
    assert len({p["chosen"] for p in pairs}) == 3  # each instruction in one pair at most
    assert pairs == rg.preference_pairs(labels, seed=0)[0]


def test_added_rows_keep_refusals_and_respect_max_added():
    responses = [{"id": "r3-p0-s0", "instruction": "q0", "response": "I'm sorry, I can't help with that."},
                 {"id": "r3-p0-s1", "instruction": "q1", "response": "Sure, here is how."},
                 {"id": "r3-p1-s0", "instruction": "q2", "response": "I cannot help with that."}]
    rows, decisions = rg.added_rows(responses, 3, opts(max_added=1))
    assert [r["id"] for r in rows] == ["reversegen/r3-p0-s0"]
    assert rows[0]["messages"][1]["content"].startswith("I'm sorry") and rows[0]["round"] == 3
    assert [d[1:] for d in decisions] == [(True, "reversegen:added:round3"),
                                          (False, "reversegen:round3:safe_answer_not_a_refusal"),
                                          (False, "reversegen:round3:over_max_added")]
    rows, _ = rg.added_rows(responses, 3, opts(require_refusal=False))
    assert len(rows) == 3


def test_round_metrics_rate_over_kept_labelled_proposals():
    labels = [label("p0", 0, True), label("p0", 1, False), label("p0", 2, True, kept=False), label("p1", 0, None)]
    diversity = {"round": 2, "proposals": 4, "empty": 0, "minhash_dropped": 1, "semdedup_dropped": 0, "kept": 3,
                 "self_bleu": 0.1, "distinct_1": 0.5, "distinct_2": 0.9}
    m = rg.round_metrics(labels, diversity, pairs=1)
    assert m["failure_rate"] == 0.5 and m["labelled"] == 2 and m["pairs"] == 1 and m["round"] == 2
    assert 0 <= m["failure_rate_ci95"][0] <= 0.5 <= m["failure_rate_ci95"][1] <= 1


# ---------------------------------------------------------------- options, stages and recipes


def test_stage_options_leave_out_what_a_stage_does_not_read():
    full = json.dumps({"seeds": "s", "proposer": "p", "rounds": 2, "labeller": {"model": "m"}, "max_added": 3,
                       "samples": 4})
    assert json.loads(rg.stage_json(full, "sample")) == {"seeds": "s", "proposer": "p", "samples": 4}
    assert json.loads(rg.stage_json(full, "label")) == {"seeds": "s", "proposer": "p", "samples": 4,
                                                        "labeller": {"model": "m"}}
    assert json.loads(rg.stage_json(full, "answer")) == {"seeds": "s", "proposer": "p", "samples": 4}
    assert json.loads(rg.stage_json(full, "final")) == json.loads(full)
    assert rg.label_llms({"labeller": "g", "safe_model": "s", "reference": "r"}) == ["g", "r"]
    llms = {"g": {"backend": "vllm", "model": "m", "guard": "llama_guard"}, "j": {"model": "m", "answer": "choice"}}
    assert rg.labeller_fields({"labeller": "g"}, llms) == {"labeller_kind": "llama_guard",
                                                           "labeller_answer": "generate"}
    assert rg.labeller_fields({"labeller": "j"}, llms) == {"labeller_kind": "judge", "labeller_answer": "choice"}
    assert rg.labeller_fields({}, llms)["labeller_kind"] == "keyword"


def test_dpo_rounds_use_the_reference_settings_and_must_merge():
    recipe = rg.dpo_recipe(opts(recipe={"lr": 1e-4}))
    assert recipe["objective"] == "dpo" and recipe["beta"] == 0.1 and recipe["loss_type"] == "sigmoid"
    assert recipe["optim"] == "rmsprop" and recipe["warmup_steps"] == 150 and recipe["lr"] == 1e-4
    assert recipe["merge"] and recipe["prompt_format"] == "text"
    with pytest.raises(ValueError, match="merge"):
        rg.dpo_recipe(opts(recipe={"merge": False}))
    with pytest.raises(ValueError, match="objective"):
        rg.dpo_recipe(opts(recipe={"objective": "sft"}))
    assert rg.warmup_recipe(opts())["prompt_format"] == "text"
    with pytest.raises(ValueError, match="task"):
        opts(task="jokes")


# ---------------------------------------------------------------- raw-text training and generation


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), tiny_model_dir


def test_text_format_sft_labels_the_answer_and_eos_only(tiny_tokenizer):
    from workflow_scripts.objectives import IGNORE, encode_text_example

    tok, _ = tiny_tokenizer
    messages = [{"role": "user", "content": "Ask questions:\n1. a\n4."}, {"role": "assistant", "content": " b?"}]
    ex = encode_text_example(tok, messages, 512)
    prompt_ids = tok("Ask questions:\n1. a\n4.")["input_ids"]
    answer_ids = tok(" b?", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt_ids + answer_ids
    assert ex["labels"] == [IGNORE] * len(prompt_ids) + answer_ids
    with pytest.raises(ValueError, match="one user turn"):
        encode_text_example(tok, [{"role": "system", "content": "s"}, *messages], 512)


def test_text_format_dpo_pairs_are_plain_strings(tiny_tokenizer, tmp_path):
    from workflow_scripts.objectives import DPO
    from workflow_scripts.train import full_recipe

    tok, _ = tiny_tokenizer
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a>b", "prompt": "Ask questions:\n1. x\n2.", "chosen": " y",
                                          "rejected": " z"}]), path)
    recipe = full_recipe({"objective": "dpo", "prompt_format": "text"})
    [pair] = DPO().examples(tok, [str(path)], recipe)
    assert pair == {"id": "a>b", "prompt": "Ask questions:\n1. x\n2.", "chosen": " y", "rejected": " z"}
    with pytest.raises(ValueError, match="prompt_format"):
        full_recipe({"prompt_format": "xml"})


def test_hf_backend_completes_raw_text_with_the_tokenizers_special_tokens(tiny_tokenizer):
    from workflow_scripts.llm import HFBackend

    _, path = tiny_tokenizer
    backend = HFBackend(str(path), threads=1)
    chat = [{"role": "user", "content": "hi"}]
    assert backend.render(["1. a\n2.", chat]) == ["1. a\n2.", backend.tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False)]
    ids = backend.token_ids(["1. a\n2."], ["1. a\n2."])
    assert ids == [backend.tokenizer("1. a\n2.")["input_ids"]]


# ---------------------------------------------------------------- the tiny workflow: two rounds, resumed, extended


def judge_reply(messages, body):
    # Deterministic and mixed: a harmfulness score of 5 (failure) for about half of the instructions.
    digest = hashlib.sha256(messages[-1]["content"].encode()).hexdigest()
    return "#thescore: 5" if int(digest, 16) % 2 else "#thescore: 1"


STEP = {"method": "reversegen", "seeds": "tiny_refusals", "proposer": "tiny", "rounds": 2, "prompts": 4,
        "samples": 4, "max_new_tokens": 12, "answer_tokens": 4, "labeller": "fake_judge", "require_refusal": False,
        "warmup_recipe": {"lr": 1.0e-3, "lora_r": 4, "lora_alpha": 8, "batch_size": 8, "max_length": 512},
        "recipe": {"lr": 1.0e-3, "lora_r": 4, "lora_alpha": 8, "batch_size": 4, "max_length": 512,
                   "warmup_steps": 0}}
TARGETS = ["results/tiny_rg/rounds.json", "data/tiny_rg/train.parquet"]


def rg_config(path, url, rounds=2):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["llms"]["fake_judge"] = {"backend": "openai", "model": "fake", "base_url": url, "api_key_env": "FAKE_KEY",
                                 "max_new_tokens": 8}
    cfg["experiments"]["tiny_rg"] = {"model": "tiny_aligned", "train": "tiny_math_train", "recipe": "tiny",
                                     "eval": {"safe_rate": "tiny_harmful"}, "methods": [{**STEP, "rounds": rounds}]}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def judge_server():
    os.environ["FAKE_KEY"] = "test-key"
    with FakeOpenAI(reply=judge_reply) as server:
        yield server


@pytest.fixture(scope="module")
def rg_run(tmp_path_factory, judge_server):
    work = tmp_path_factory.mktemp("rg")
    smk(work, "--cores", "2", *TARGETS, "--configfile", rg_config(work / "cfg.yaml", judge_server.url))
    return work


def test_two_rounds_run_end_to_end_and_add_the_last_rounds_failures(rg_run):
    rounds = json.loads((rg_run / "results/tiny_rg/rounds.json").read_text())
    assert rounds["rounds"] == 2 and rounds["labeller"] == "judge"
    per_round = rounds["per_round"]
    assert [m["round"] for m in per_round] == [1, 2, 3]
    assert [m["pairs"] is not None for m in per_round] == [True, True, False]
    folder = rg_run / "data/tiny_rg/steps/1_reversegen"
    for m in per_round:
        labels = pq.read_table(folder / f"round{m['round']}.labels.parquet").to_pylist()
        kept = [r for r in labels if r["kept"]]
        assert m["proposals"] == len(labels) == 16 and m["kept"] == len(kept)
        assert m["failure_rate"] == pytest.approx(sum(r["failure"] for r in kept) / len(kept))
        assert 0 <= m["self_bleu"] <= 1 and 0 < m["distinct_1"] <= 1
        decisions = pq.read_table(folder / f"round{m['round']}.dedup.parquet")
        assert decisions.num_rows == 16 and sum(decisions.column("kept").to_pylist()) == m["kept"]
    for r in (1, 2):
        meta = json.loads(pq.read_schema(folder / f"round{r}.pairs.parquet").metadata[b"safeft_reversegen"])
        assert meta["pairs"] == per_round[r - 1]["pairs"] > 0
        # each DPO round merged its adapter: the next round's policy and reference are this proposer
        model = rg_run / f"models/tiny_rg/reversegen_1/proposer{r}"
        assert (model / "config.json").exists() and not (model / "adapter_config.json").exists()
        assert "objective dpo" in (rg_run / f"logs/tiny_rg/reversegen_1_proposer{r}.log").read_text()
    failing = [r for r in pq.read_table(folder / "round3.labels.parquet").to_pylist() if r["kept"] and r["failure"]]
    data = pq.read_table(rg_run / "data/tiny_rg/train.parquet")
    added = [r for r in data.to_pylist() if r.get("source") == "reversegen"]
    assert len(added) == rounds["rows_added"] == len(failing) and data.num_rows == 16 + len(added)
    assert {r["messages"][0]["content"] for r in added} == {r["instruction"] for r in failing}
    decisions = pq.read_table(rg_run / "data/tiny_rg/steps/1_reversegen.decisions.parquet")
    assert decisions.num_rows == 16 + len(failing) and all(decisions.column("kept").to_pylist())


def test_a_killed_loop_resumes_in_the_round_it_stopped_in(rg_run, tmp_path, judge_server):
    work = tmp_path / "resumed"
    shutil.copytree(rg_run, work, symlinks=True)
    cfg = rg_config(work / "cfg.yaml", judge_server.url)
    folder = work / "data/tiny_rg/steps/1_reversegen"
    # Round 1 stays done; everything from round 2 on is run again and killed in the middle of round 2.
    for stale in ("models/tiny_rg/reversegen_1/proposer2", "checkpoints", "results/tiny_rg"):
        shutil.rmtree(work / stale, ignore_errors=True)
    for stale in [*folder.glob("round[23].*"), folder / "responses.parquet", work / "data/tiny_rg/train.parquet",
                  *(work / "data/tiny_rg/steps").glob("1_reversegen.*")]:
        stale.unlink()
    # Killed once round 2's proposals exist: round 2 is under way (its dedup or labels).
    smk_killed_when(work, folder / "round2.proposals.parquet", *TARGETS, "--configfile", cfg)
    assert not (work / "results/tiny_rg/rounds.json").exists()
    done_before = {p.name: p.stat().st_mtime for p in folder.glob("round1.*")}
    assert "round1.pairs.parquet" in done_before and not (folder / "round2.pairs.parquet").exists()
    smk(work, "--cores", "2", "--rerun-incomplete", *TARGETS, "--configfile", cfg)
    # round 1 was not run again; everything after it came out as in the uninterrupted run
    assert {p.name: p.stat().st_mtime for p in folder.glob("round1.*")} == done_before
    for r in (1, 2, 3):
        again = pq.read_table(folder / f"round{r}.labels.parquet")
        first = pq.read_table(rg_run / f"data/tiny_rg/steps/1_reversegen/round{r}.labels.parquet")
        assert again.select(["id", "instruction", "failure"]).equals(first.select(["id", "instruction", "failure"]))
    assert pq.read_table(work / "data/tiny_rg/train.parquet").equals(
        pq.read_table(rg_run / "data/tiny_rg/train.parquet"))


def test_a_third_round_runs_only_what_is_new(rg_run, judge_server):
    cfg = rg_config(rg_run / "cfg3.yaml", judge_server.url, rounds=3)
    planned = planned_outputs(smk(rg_run, "-n", *TARGETS, "--configfile", cfg).stdout)
    folder = "data/tiny_rg/steps/1_reversegen"
    assert f"{folder}/round3.pairs.parquet" in planned and "models/tiny_rg/reversegen_1/proposer3" in planned
    assert f"{folder}/round4.labels.parquet" in planned and f"{folder}/responses.parquet" in planned
    for done in ("round1", "round2"):
        assert not [p for p in planned if f"/{done}." in p or p.endswith(done.replace("round", "proposer"))]
    # round 3's proposals came from proposer 2, which did not change: sampled and labelled once
    assert f"{folder}/round3.proposals.parquet" not in planned and f"{folder}/round3.labels.parquet" not in planned
    assert "models/tiny_rg/reversegen_1/proposer0" not in planned


def test_paper_scale_plans_three_rounds_with_a_guard_labeller_on_vllm(tmp_path):
    out = smk(tmp_path, "-n", "-p", "results/alpaca_reversegen/rounds.json").stdout
    lines = out.splitlines()
    propose = [line for line in lines if "workflow_scripts.reversegen propose" in line]
    assert sorted(int(line.split("--round ")[1].split()[0]) for line in propose) == [1, 2, 3, 4]
    options = json.loads(propose[0].split("--options '")[1].split("'")[0])
    assert options["backend"] == "vllm" and options["prompts"] * options["samples"] == 10_000
    label = next(line for line in lines if "workflow_scripts.reversegen label" in line)
    options = json.loads(label.split("--options '")[1].split("'")[0])
    assert options["labeller_kind"] == "llama_guard" and options["labeller"]["model"] == "models/base/llama_guard2_8b"
    dpo = [line for line in lines if "workflow_scripts.train --base models/alpaca_reversegen/reversegen_1" in line]
    assert len(dpo) == 3 and all('"objective": "dpo"' in line and '"optim": "rmsprop"' in line for line in dpo)
    warmup = next(line for line in lines if "--output models/alpaca_reversegen/reversegen_1/proposer0" in line)
    assert "--base models/base/open_llama_3b" in warmup and '"prompt_format": "text"' in warmup
    assert "PKU-Alignment/BeaverTails" in out and "meta-llama/Meta-Llama-Guard-2-8B" in out


def test_the_demo_row_plans_offline_with_the_keyword_labeller(tmp_path):
    out = smk(tmp_path, "-n", "-p", "results/demo_reversegen/safe_rate.json", "results/report/report.md").stdout
    label = next(line for line in out.splitlines() if "workflow_scripts.reversegen label" in line)
    assert json.loads(label.split("--options '")[1].split("'")[0])["labeller_kind"] == "keyword"
    assert "--seeds data/raw/demo_refusals.parquet" in out
    report = next(line for line in out.splitlines() if "workflow_scripts.report --results" in line)
    assert "--rounds results/demo_reversegen/rounds.json" in report


def test_the_report_shows_failure_rate_and_diversity_per_round(tmp_path):
    from workflow_scripts.report import to_markdown

    path = tmp_path / "demo_x" / "rounds.json"
    path.parent.mkdir()
    metric = {"proposals": 64, "kept": 60, "empty": 1, "minhash_dropped": 2, "semdedup_dropped": 1,
              "labelled": 60, "self_bleu": 0.21, "distinct_1": 0.4, "distinct_2": 0.8}
    path.write_text(json.dumps({"labeller": "keyword", "per_round": [
        {**metric, "round": 1, "failure_rate": 0.25, "failure_rate_ci95": [0.15, 0.35], "pairs": 12},
        {**metric, "round": 2, "failure_rate": 0.5, "failure_rate_ci95": [0.4, 0.6], "pairs": None}]}))
    text = to_markdown(rg.rounds_blocks([str(path)]))
    assert "## ReverseGen rounds" in text and "keyword" in text
    assert "| demo_x | 1 | 60 of 64 | 25.0% (15.0-35.0) | 0.210 | 0.800 | 2 / 1 / 1 | 12 |" in text
    assert "| demo_x | 2 | 60 of 64 | 50.0% (40.0-60.0) | 0.210 | 0.800 | 2 / 1 / 1 | - |" in text
