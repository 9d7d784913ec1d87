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
