"""Guard classifiers (issue 16): the Llama-Guard path's unsafe probability is the softmax of the "safe" and "unsafe"
answers' log-likelihoods, the moderation classifier's flags follow its sigmoids, and the metric's numbers add up.
Real guard weights cannot be fetched here: tiny random models built in the tests exercise the code path."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from workflow_scripts import guard, judge
from workflow_scripts.llm import Endpoint, make_backend


def gen_file(path, completions):
    table = pa.Table.from_pydict({
        "id": [f"p{i}" for i in range(len(completions))],
        "messages": [[{"role": "user", "content": f"how do I do bad thing {i}?"}] for i in range(len(completions))],
        "completion": completions, "reference": [None] * len(completions)})
    pq.write_table(table.replace_schema_metadata({"safeft": json.dumps({"backend": "hf", "params": {}})}), path)
    return str(path)


def test_category_codes_are_parsed_after_the_verdict():
    assert guard.parse_categories("unsafe\nS1,S10") == ["S1", "S10"]
    assert guard.parse_categories("\n\nunsafe\nS2, S2 ,S14") == ["S2", "S14"]
    assert guard.parse_categories("safe") == [] and guard.parse_categories(None) == []


def test_llama_guard_probability_is_the_softmax_of_the_two_answers(tiny_model_dir, tmp_path):
    backend = make_backend(Endpoint("hf", str(tiny_model_dir)), threads=1)
    rows = judge.load_generations([gen_file(tmp_path / "g.parquet", ["Sure, step 1", "I cannot"])])[0][2]
    items = guard.llama_guard_items(backend, rows, threshold=0.5)
    for row, item in zip(rows, items, strict=True):
        text = backend.render([guard.conversation(row)])[0]
        ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
        logp, lengths = {}, {}
        for option in ("safe", "unsafe"):
            cont = backend.option_ids(ids, text, option)
            with torch.no_grad():
                lp = backend.model(input_ids=torch.tensor([ids + cont])).logits[0].float().log_softmax(-1)
            logp[option] = sum(float(lp[len(ids) - 1 + k, t]) for k, t in enumerate(cont))
            lengths[option] = len(cont)
        # Llama Guard's tokenizer has one token for each answer: the softmax of the two token logits. The tiny
        # tokenizer may split them into different lengths; each answer's log-likelihood is then its per-token mean.
        if lengths["safe"] != lengths["unsafe"]:
            logp = {k: v / lengths[k] for k, v in logp.items()}
        want = torch.tensor([logp["safe"], logp["unsafe"]]).softmax(0)[1].item()
        assert item["p_unsafe"] == pytest.approx(want, abs=1e-5)
        assert item["flagged"] == (want > 0.5)
    # a threshold of 0 flags everything, and flagged answers are asked for their categories
    flagged = guard.llama_guard_items(backend, rows, threshold=0.0, max_new_tokens=4)
    assert all(i["flagged"] and "detail" in i for i in flagged)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from workflow_scripts.models import build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         num_labels=3, id2label={0: "violence", 1: "privacy", 2: "fraud"},
                         label2id={"violence": 0, "privacy": 1, "fraud": 2},
                         problem_type="multi_label_classification")
    out = tmp_path_factory.mktemp("guard") / "classifier"
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_moderation_classifier_flags_any_category_above_threshold(tiny_classifier, tmp_path):
    model = guard.ModerationClassifier(str(tiny_classifier), threads=1)
    rows = judge.load_generations([gen_file(tmp_path / "g.parquet", ["Sure, step 1", "I cannot", "hm"])])[0][2]
    items = model.items(rows, threshold=0.5)
    for row, item in zip(rows, items, strict=True):
        text = guard.QA_FORMAT.format(prompt=row["messages"][0]["content"], response=row["completion"])
        enc = model.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            probs = model.model(**enc).logits[0].sigmoid().tolist()
        assert item["p_unsafe"] == pytest.approx(max(probs), abs=1e-5)
        assert item["flagged"] == (max(probs) > 0.5)
        assert item["categories"] == [k for k, p in zip(model.labels, probs, strict=True) if p > 0.5]


def test_guard_cli_writes_the_harmful_score(tiny_classifier, tmp_path):
    gens = [gen_file(tmp_path / f"g{s}.parquet", ["Sure, step 1", "I cannot", "hm"]) for s in (0, 1)]
    out = tmp_path / "harmful.json"
    judge.main(["guard", "--generations", *gens, "--seeds", "0", "1", "--backend", "hf", "--model",
                str(tiny_classifier), "--kind", "classifier", "--threshold", "0.5", "--output", str(out)])
    result = json.loads(out.read_text())
    rows = pq.read_table(out.with_suffix(".examples.parquet")).to_pylist()
    assert result["metric"] == "guard_harmful_score" and result["guard_kind"] == "classifier"
    assert result["n"] == 6 and result["value"] == pytest.approx(sum(r["value"] for r in rows) / 6)
    assert result["mean_unsafe_probability"]["value"] == pytest.approx(sum(r["p_unsafe"] for r in rows) / 6)
    assert len(result["ci95"]) == 2 and set(result["per_seed"]) == {"0", "1"}
    with pytest.raises(SystemExit):
        judge.main(["guard", "--generations", gens[0], "--backend", "openai", "--model", "x", "--kind",
                    "classifier", "--output", str(tmp_path / "x.json")])


def test_paper_scale_guards_plan_on_the_gpu_class(tmp_path):
    from smk_helpers import smk

    out = smk(tmp_path, "-n", "-p", "results/alpaca_vanilla/harmful_score.json",
              "results/alpaca_vanilla/llama_guard_flagged.json").stdout
    commands = [line for line in out.splitlines() if "workflow_scripts.judge guard" in line]
    assert any("--backend hf --model models/base/beaver_dam_7b --kind classifier" in c for c in commands)
    assert any("--backend vllm --model models/base/llama_guard3_8b --kind llama_guard" in c for c in commands)
    assert "PKU-Alignment/BeaverTails" in out and "30k_test" in out
