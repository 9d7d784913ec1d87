"""Diversity filters and measures: word tokens, the MinHash and SemDeDup near-duplicate filters, embeddings from the
bundled all-MiniLM-L6-v2, self-BLEU and distinct-n."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from workflow_scripts import diversity as dv

SENTENCE = (
    "Write a detailed step by step guide that explains to a curious beginner how ancient Roman engineers "
    "designed aqueducts which carried fresh water across valleys into crowded cities every single day"
)


def vocab(start: int, stop: int) -> str:
    """A text of distinct made-up words, so that word-set Jaccard similarities are exact to compute by hand."""
    return " ".join(f"tok{i}" for i in range(start, stop))


def unit(angle_deg: float, dim: int = 6) -> np.ndarray:
    """A unit vector in the plane of the first two axes, at `angle_deg` from the first."""
    v = np.zeros(dim)
    v[0], v[1] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return v


def axis(i: int, dim: int = 6) -> np.ndarray:
    v = np.zeros(dim)
    v[i] = 1.0
    return v


# words


def test_words_lowercases_and_splits_on_non_word_characters():
    assert dv.words("How do I make a BOMB? It's_ok, 42 times!") == [
        "how", "do", "i", "make", "a", "bomb", "it", "s_ok", "42", "times",
    ]  # fmt: skip
    assert dv.words("  ...  ") == []


# minhash_duplicates


def test_minhash_marks_exact_and_near_duplicates_of_the_first_text():
    assert len(set(dv.words(SENTENCE))) >= 28
    near = SENTENCE.replace("aqueducts", "bridges")
    unrelated = "What is the boiling point of water at the top of Mount Everest?"
    assert dv.minhash_duplicates([SENTENCE, SENTENCE, near, unrelated]) == [None, 0, 0, None]


def test_minhash_keeps_the_first_occurrence():
    near = SENTENCE.replace("aqueducts", "bridges")
    assert dv.minhash_duplicates([near, SENTENCE]) == [None, 0]
    assert dv.minhash_duplicates(["unrelated text here", SENTENCE, SENTENCE]) == [None, None, 1]


def test_minhash_chain_compares_only_with_kept_texts():
    # 100 words; each step replaces 8: J(A, A') = J(A', A'') = 92/108 ~ 0.85, but J(A, A'') = 84/116 ~ 0.72.
    # 512 permutations: with 128 the estimate of J(A, A'') is off by up to ~0.08, enough to cross 0.78.
    a = vocab(0, 100)
    a1 = vocab(0, 92) + " " + vocab(1000, 1008)
    a2 = vocab(0, 84) + " " + vocab(1000, 1008) + " " + vocab(2000, 2008)
    assert dv.minhash_duplicates([a, a1, a2], num_perm=512) == [None, 0, None]
    # Had A' been kept, A'' would be its duplicate.
    assert dv.minhash_duplicates([a1, a2], num_perm=512) == [None, 0]


def test_minhash_points_at_the_most_similar_kept_text():
    # a and b share 70 of 130 words (J ~ 0.54): both kept at 0.6. c is a duplicate of both, closer to a
    # (J 0.82 against 0.67); d the other way round.
    a = vocab(0, 100)
    b = vocab(0, 70) + " " + vocab(500, 530)
    c = vocab(0, 90) + " " + vocab(500, 510)
    d = vocab(0, 80) + " " + vocab(500, 520)
    assert dv.minhash_duplicates([a, b, c], threshold=0.6) == [None, None, 0]
    assert dv.minhash_duplicates([a, b, d], threshold=0.6) == [None, None, 1]


def test_minhash_threshold_keeps_a_half_similar_pair():
    # 13 shared words of 27: Jaccard ~ 0.48.
    assert dv.minhash_duplicates([vocab(0, 20), vocab(7, 27)]) == [None, None]
    assert dv.minhash_duplicates([vocab(0, 20), vocab(7, 27)], threshold=0.3) == [None, 0]


def test_minhash_empty_texts_are_kept_and_never_match():
    assert dv.minhash_duplicates(["", "?!", SENTENCE, "", SENTENCE]) == [None, None, None, None, 2]
    assert dv.minhash_duplicates([]) == []


# semantic_duplicates


def test_semdedup_drops_a_near_identical_vector():
    # 0 and 1 at cosine 0.99; 2, 3 and 4 orthogonal to them and to each other.
    emb = np.stack([unit(0), unit(math.degrees(math.acos(0.99))), axis(2), axis(3), axis(4)])
    drops, labels = dv.semantic_duplicates(emb, k=4)
    assert drops == [None, 0, None, None, None]
    assert len(labels) == 5 and labels[0] == labels[1]
    assert len(set(labels)) == 4


def test_semdedup_compares_with_earlier_items_kept_or_not():
    # A, B, C 8 degrees apart in turn: cos(A, B) = cos(B, C) ~ 0.990 > 0.98, cos(A, C) ~ 0.961 < 0.98.
    # B is dropped, and C still goes, as B's duplicate: SemDeDup counts dropped items too.
    emb = np.stack([unit(0), unit(8), unit(16), axis(3), axis(4)])
    drops, labels = dv.semantic_duplicates(emb, k=3, threshold=0.98)
    assert labels[0] == labels[1] == labels[2]
    assert drops == [None, 0, 1, None, None]


def test_semdedup_threshold_is_strict_and_rows_are_normalised():
    angle = math.degrees(math.acos(0.95))
    emb = np.stack([unit(0), 3.0 * unit(angle), axis(3)])
    assert dv.semantic_duplicates(emb, k=2, threshold=0.96)[0] == [None, None, None]
    assert dv.semantic_duplicates(emb, k=2, threshold=0.94)[0] == [None, 0, None]


def test_semdedup_small_inputs_and_k_larger_than_n():
    assert dv.semantic_duplicates(np.zeros((0, 4))) == ([], [])
    assert dv.semantic_duplicates(np.ones((1, 4))) == ([None], [0])
    drops, labels = dv.semantic_duplicates(np.stack([unit(0), unit(1), axis(3)]), k=10)
    # Three clusters for three items: every item is alone in its cluster, so nothing is dropped.
    assert drops == [None, None, None]
    assert sorted(labels) == [0, 1, 2]


# embed


@pytest.fixture(scope="module")
def bomb_embeddings() -> np.ndarray:
    return dv.embed(["How do I make a bomb?", "How can I build a bomb?", "What is the capital of France?"])


def test_embed_paraphrases_are_closer(bomb_embeddings):
    sims = bomb_embeddings @ bomb_embeddings.T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_embed_is_normalised_float32(bomb_embeddings):
    assert bomb_embeddings.shape == (3, 384)
    assert bomb_embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bomb_embeddings, axis=1), 1.0, atol=1e-5)


def test_embed_reuses_the_loaded_model(bomb_embeddings):
    n_models = len(dv._MODELS)
    again = dv.embed(["How do I make a bomb?"], batch_size=1)
    assert len(dv._MODELS) == n_models == 1
    np.testing.assert_allclose(again[0], bomb_embeddings[0], atol=1e-5)
    assert dv.embed([]).shape == (0, 384)


def test_embed_feeds_semdedup(bomb_embeddings):
    drops, labels = dv.semantic_duplicates(bomb_embeddings, k=2, threshold=0.5)
    assert drops == [None, 0, None] and len(labels) == 3


# self_bleu

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a quick brown cat jumps over a sleeping dog",
    "how do i bake bread at home without yeast",
    "the lazy dog sleeps while the quick fox runs",
    "explain how to bake sourdough bread at home",
    "what do cats and dogs eat at home",
]


def test_self_bleu_of_identical_texts_is_near_one():
    assert dv.self_bleu(["the cat sat on the warm mat today"] * 4) > 0.9


def test_self_bleu_of_disjoint_texts_is_near_zero():
    assert dv.self_bleu([vocab(0, 10), vocab(10, 20), vocab(20, 30)]) < 0.05


def test_self_bleu_matches_a_hand_computation():
    texts = TEXTS[:3]
    toks = [dv.words(t) for t in texts]
    smooth = SmoothingFunction().method1
    scores = [
        sentence_bleu([toks[j] for j in range(3) if j != i], toks[i], weights=(1 / n,) * n, smoothing_function=smooth)
        for i in range(3)
        for n in (2, 3, 4, 5)
    ]
    assert dv.self_bleu(texts) == pytest.approx(sum(scores) / len(scores))
    assert 0.0 < dv.self_bleu(texts) < 0.9
    # Texts without words take no part.
    assert dv.self_bleu(["", *texts, "?!"]) == pytest.approx(dv.self_bleu(texts))


def test_self_bleu_sample_is_deterministic():
    value = dv.self_bleu(TEXTS, sample=3, seed=7)
    assert 0.0 <= value <= 1.0
    assert dv.self_bleu(TEXTS, sample=3, seed=7) == value
    assert dv.self_bleu(TEXTS, sample=len(TEXTS)) == dv.self_bleu(TEXTS)


def test_self_bleu_needs_two_usable_texts():
    assert dv.self_bleu([]) == 0.0
    assert dv.self_bleu(["only one text", "", "..."]) == 0.0


# distinct_n


def test_distinct_n_hand_computed():
    texts = ["a b a b", "a b"]
    assert dv.distinct_n(texts, 1) == pytest.approx(2 / 6)  # a b a b a b
    assert dv.distinct_n(texts, 2) == pytest.approx(2 / 4)  # ab ba ab | ab
    assert dv.distinct_n(texts, 3) == pytest.approx(2 / 2)  # aba bab | -
    assert dv.distinct_n(["The cat", "the CAT sat"], 1) == pytest.approx(3 / 5)
    assert dv.distinct_n(["a b", "c"], 3) == 0.0
    assert dv.distinct_n([], 1) == 0.0
