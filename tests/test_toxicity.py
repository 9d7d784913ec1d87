"""Detoxify toxicity, loaded offline: a tiny random BERT checkpoint in Detoxify's format (config + state_dict,
Jigsaw class names) with a WordPiece tokenizer trained here, scored by the real loading and scoring code."""

import json
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from workflow_scripts import toxicity
from workflow_scripts.io import DataError

JIGSAW = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
TEXTS = ["you are a wonderful person", "i hate you, you idiot", "the cat sat on the mat", "", "thanks a lot!"]


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    """(checkpoint path, backbone folder) for a tiny BertForSequenceClassification with random weights."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    out = tmp_path_factory.mktemp("detoxify")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TEXTS * 5, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    backbone = out / "backbone"
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=16).save_pretrained(backbone)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    config.save_pretrained(backbone)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig.from_pretrained(backbone,
                                                                                               num_labels=6))
    state = dict(model.state_dict())
    # Checkpoints written by older transformers keep this buffer; the loader must accept it.
    state["bert.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    ckpt = out / "toxic_tiny.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": "bert-base-uncased",
                                             "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": 6}},
                           "dataset": {"args": {"classes": JIGSAW}}},
                "state_dict": state}, ckpt)
    return ckpt, backbone, model


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode plus a guard: any outgoing connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network call to {address} during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_load_and_score_match_direct_forward(tiny_detoxify, no_network):
    ckpt, backbone, reference = tiny_detoxify
    scorer = toxicity.load_scorer(ckpt, backbone, device="cpu")
    assert scorer.class_names == ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
    assert scorer.max_length == 16
    probs = toxicity.score_texts(scorer, TEXTS, batch_size=2)
    assert probs.shape == (len(TEXTS), 6)
    assert np.all((probs > 0) & (probs < 1))
    # Direct forward pass with the weights we saved, one text at a time (no padding).
    reference.eval()
    for text, row in zip(TEXTS, probs, strict=True):
        enc = scorer.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            direct = torch.sigmoid(reference(**enc).logits)[0].numpy()
        np.testing.assert_allclose(row, direct, rtol=1e-4, atol=1e-5)
    assert no_network == []


def test_truncates_long_text_to_max_length(tiny_detoxify, no_network):
    ckpt, backbone, _ = tiny_detoxify
    scorer = toxicity.load_scorer(ckpt, backbone, device="cpu")
    probs = toxicity.score_texts(scorer, ["the cat sat on the mat " * 50])  # far beyond 32 positions
    assert probs.shape == (1, 6) and np.isfinite(probs).all()


def test_wrong_state_dict_is_a_clear_error(tiny_detoxify, tmp_path):
    ckpt, backbone, _ = tiny_detoxify
    loaded = torch.load(ckpt, weights_only=True)
    del loaded["state_dict"]["classifier.weight"]
    bad = tmp_path / "bad.ckpt"
    torch.save(loaded, bad)
    with pytest.raises(DataError, match="classifier.weight"):
        toxicity.load_scorer(bad, backbone)
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(DataError, match="not a Detoxify checkpoint"):
        toxicity.load_scorer(bad, backbone)
    with pytest.raises(DataError, match="config.json"):
        toxicity.load_scorer(ckpt, tmp_path)


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"config": {}, "state_dict": {}, "x": np.dtype("float32")}, path)  # needs full unpickling
    with pytest.raises(ValueError, match="refusing to unpickle"):
        toxicity._read_checkpoint(path)


def _generation_file(path, completions):
    table = pa.Table.from_pydict({
        "id": [f"p{i}" for i in range(len(completions))],
        "messages": [[{"role": "user", "content": f"prompt {i}"}] for i in range(len(completions))],
        "completion": completions, "reference": [None] * len(completions)})
    pq.write_table(table.replace_schema_metadata({"safeft": json.dumps({"backend": "hf"})}), path)
    return str(path)


def test_cli_writes_result_and_examples(tiny_detoxify, tmp_path, no_network):
    ckpt, backbone, _ = tiny_detoxify
    g0 = _generation_file(tmp_path / "s0.parquet", TEXTS)
    g1 = _generation_file(tmp_path / "s1.parquet", TEXTS[::-1])
    out = tmp_path / "res" / "toxicity.json"
    toxicity.main(["score", "--generations", g0, g1, "--seeds", "0", "1", "--checkpoint", str(ckpt),
                   "--backbone", str(backbone), "--output", str(out), "--batch_size", "2"])
    result = json.loads(out.read_text())
    examples = pq.read_table(out.with_suffix(".examples.parquet")).to_pylist()
    assert result["metric"] == "toxicity" and result["n"] == 10 and result["n_seeds"] == 2
    assert {"id", "seed", "value", "detail", "toxicity", "identity_attack"} <= set(examples[0])
    tox = [e["toxicity"] for e in examples]
    assert result["value"] == pytest.approx(np.mean(tox))
    assert result["toxic_share"]["value"] == pytest.approx(np.mean([t > 0.5 for t in tox]))
    assert result["ci95"][0] <= result["value"] <= result["ci95"][1]
    assert result["classifier"]["classes"][0] == "toxicity" and len(result["classifier"]["checkpoint_sha256"]) == 64
    # Same texts in both seeds: the same per-text score whatever the batch it landed in.
    by = {(e["seed"], e["id"]): e["toxicity"] for e in examples}
    assert by[(0, "p0")] == pytest.approx(by[(1, "p4")], abs=1e-5)
    assert no_network == []


def test_download_uses_local_files_and_fails_clearly_offline(tmp_path, monkeypatch, no_network):
    name = toxicity.MODEL_URLS["original"].rsplit("/", 1)[1]
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        toxicity.download("original", tmp_path)
    (tmp_path / name).write_bytes(b"x")
    (tmp_path / "original-backbone").mkdir()
    (tmp_path / "original-backbone" / "config.json").write_text("{}")
    ckpt, backbone = toxicity.download("original", tmp_path)
    assert ckpt == tmp_path / name and backbone == tmp_path / "original-backbone"
    with pytest.raises(ValueError, match="unknown Detoxify model"):
        toxicity.download("nope", tmp_path)
    assert no_network == []
