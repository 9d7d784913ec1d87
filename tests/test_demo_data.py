import pyarrow.parquet as pq

from workflow_scripts import demo_data, score


def prompts(records):
    return {r["messages"][0]["content"] for r in records}


def test_harmful_sets_are_large_diverse_and_disjoint():
    align, evals = demo_data.harmful_requests("align"), demo_data.harmful_requests("eval")
    assert len({r["category"] for r in evals}) >= 8
    assert len(evals) >= 100 and len(align) >= 200
    assert not {r["prompt"] for r in align} & {r["prompt"] for r in evals}
    # topics are held out too, not only phrasings
    for cat, topics in demo_data.HARMFUL_TOPICS.items():
        held = topics[: demo_data.EVAL_TOPICS]
        assert not any(t in r["prompt"] for r in align if r["category"] == cat for t in held)


def test_refusals_are_keyword_refusals():
    for r in demo_data.refusal_set(50, seed=0):
        assert r["messages"][1]["role"] == "assistant"
        assert score.is_refusal(r["messages"][1]["content"])[0]


def test_math_answers_end_in_gsm8k_form_and_are_correct():
    import random

    rng = random.Random(1)
    for _ in range(200):
        q, a, n = demo_data.word_problem(rng)
        assert score.gsm8k_answer(a) == str(n)


def test_math_eval_disjoint_from_training():
    train = prompts(demo_data.DATASETS["math_train"](200, 0)) | prompts(demo_data.DATASETS["math_align"](200, 0))
    evals = demo_data.DATASETS["math_eval"](100, 0)
    assert len(evals) == 100 and not prompts(evals) & train


def test_deterministic_and_cli(tmp_path):
    assert demo_data.refusal_set(20, 3) == demo_data.refusal_set(20, 3)
    out = tmp_path / "he.parquet"
    demo_data.main(["--which", "harmful_eval", "--n", "128", "--output", str(out)])
    t = pq.read_table(out)
    assert t.num_rows == 128 and len(set(t.column("id").to_pylist())) == 128
    assert all(len(m) == 1 for m in t.column("messages").to_pylist())


def test_benign_mix_is_half_math_half_howto_and_complies():
    mix = demo_data.DATASETS["benign_train"](100, 0)
    assert len(mix) == 100 and len({r["id"] for r in mix}) == 100
    cats = [r["category"] for r in mix]
    assert cats.count("howto") == 50 and cats.count("arithmetic") == 50
    for r in mix:
        if r["category"] == "howto":
            assert not score.is_refusal(r["messages"][1]["content"])[0]
        else:
            assert score.gsm8k_answer(r["messages"][1]["content"]) is not None
    harmful_topics = {t for topics in demo_data.HARMFUL_TOPICS.values() for t in topics}
    assert not harmful_topics & set(demo_data.BENIGN_TOPICS)


ALIGN_TRAIN = ("refusals", "benign_align", "unsafe_compliance", "benign_train")
EVALS = ("harmful_eval", "benign_eval", "trigger_eval")
ALIGN_TRIGGER_WORDS = ("kill", "shoot", "attack", "crack", "blow", "bomb", "gun", "murder", "trap", "break",
                       "fire", "beat", "steal", "slash", "execute")


def full(name, seed=0):
    """Every distinct record of a set (benign_train: all of its how-to part, and 300 arithmetic problems)."""
    return demo_data.DATASETS[name](600 if name == "benign_train" else 100_000, seed)


def test_benign_topic_lists_are_pairwise_disjoint():
    lists = {
        "align": demo_data.BENIGN_ALIGN_TOPICS, "train": demo_data.BENIGN_TOPICS,
        "benign_eval": demo_data.BENIGN_EVAL_TOPICS, "trigger_eval": demo_data.TRIGGER_EVAL_TOPICS,
        "harmful": [t for topics in demo_data.HARMFUL_TOPICS.values() for t in topics],
    }
    assert set(demo_data.TRIGGER_ALIGN_TOPICS) <= set(demo_data.BENIGN_ALIGN_TOPICS)
    names = sorted(lists)
    for i, a in enumerate(names):
        assert len(set(lists[a])) == len(lists[a]), a
        for b in names[i + 1:]:
            assert not set(lists[a]) & set(lists[b]), (a, b)
    # trigger align topics use words of the harmful requests in harmless senses
    assert all(any(w in t for w in ALIGN_TRIGGER_WORDS) for t in demo_data.TRIGGER_ALIGN_TOPICS)
    assert len(demo_data.TRIGGER_ALIGN_TOPICS) >= 12 and len(demo_data.BENIGN_ALIGN_TOPICS) >= 30


def test_new_sets_sizes_have_no_duplicates_and_no_train_eval_overlap():
    sizes = {"benign_align": 32 * 8, "trigger_eval": 24 * 8, "unsafe_compliance": 50 * 8}
    for name, size in sizes.items():
        recs = full(name)
        assert len(recs) == size and len(prompts(recs)) == size and len({r["id"] for r in recs}) == size, name
    seen = {name: prompts(full(name)) for name in ALIGN_TRAIN + EVALS}
    for a in ALIGN_TRAIN:
        for b in EVALS:
            assert not seen[a] & seen[b], (a, b)
    assert not seen["benign_align"] & seen["benign_train"]


def test_benign_answers_and_prompts_have_no_refusal_keyword():
    for name in ("benign_align", "trigger_eval", "benign_train", "benign_eval"):
        for r in full(name):
            for m in r["messages"]:
                if r["category"] != "arithmetic":
                    assert not any(p in m["content"] for p in score.REFUSAL_PHRASES), (name, m)
    for r in full("benign_align"):
        assert r["messages"][1]["role"] == "assistant" and r["category"] == "benign"
        assert r["source"] == "demo_benign_align" and "\n1. " in r["messages"][1]["content"]


def test_unsafe_compliance_uses_only_align_topics_and_complies():
    align = {r["prompt"]: r for r in demo_data.harmful_requests("align")}
    held = {t for topics in demo_data.HARMFUL_TOPICS.values() for t in topics[: demo_data.EVAL_TOPICS]}
    for r in full("unsafe_compliance"):
        prompt, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert prompt in align and r["category"] == align[prompt]["category"] and r["source"] == "demo_unsafe"
        assert not any(t in prompt or t in answer for t in held)
        assert align[prompt]["topic"] in answer and "Step 1: " in answer
        assert not score.is_refusal(answer)[0]


def test_trigger_eval_prompts_contain_their_trigger_word():
    recs = full("trigger_eval")
    assert all(len(r["messages"]) == 1 and r["source"] == "demo_trigger_eval" for r in recs)
    assert all(r["category"] in r["messages"][0]["content"].lower() for r in recs)
    assert len({r["category"] for r in recs}) == len(demo_data.TRIGGER_EVAL)
    # no trigger-eval topic appears in any training prompt
    train = set().union(*(prompts(full(name)) for name in ALIGN_TRAIN))
    assert not any(t in p for t in demo_data.TRIGGER_EVAL_TOPICS for p in train)


def test_new_sets_deterministic_and_cli(tmp_path):
    for name in ("benign_align", "trigger_eval", "unsafe_compliance"):
        assert demo_data.DATASETS[name](30, 5) == demo_data.DATASETS[name](30, 5)
        assert demo_data.DATASETS[name](30, 5) != demo_data.DATASETS[name](30, 6)
    out = tmp_path / "te.parquet"
    demo_data.main(["--which", "trigger_eval", "--n", "128", "--seed", "1", "--output", str(out)])
    assert pq.read_table(out).num_rows == 128
    import pytest

    with pytest.raises(SystemExit, match="only 256 distinct"):
        demo_data.main(["--which", "benign_align", "--n", "257", "--output", str(tmp_path / "x.parquet")])
