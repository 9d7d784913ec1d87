"""Evidence for ReAlign's knowledge-heavy tasks: a Serper-compatible web-search retriever, an offline BM25
retriever over a local corpus, and the snippet cleaning both share (at most 5 useful snippets per query).
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from workflow_scripts.io import DataError

MAX_SNIPPETS = 5
MIN_CHARS = 25
MIN_WORDS = 4
QUERY_CHARS = 400  # search APIs reject or truncate long queries; an instruction's start says what it is about
BOILERPLATE = re.compile(
    r"cookie|privacy (policy|notice|settings)|subscribe|newsletter|javascript|enable js|your browser|"
    r"sign (up|in) to|log in to|all rights reserved|terms of (use|service)|access denied|captcha",
    re.I)
DATEISH = re.compile(
    r"(\d{1,4}|jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|june?|july?|aug(ust)?|sep(t(ember)?)?|oct(ober)?|"
    r"nov(ember)?|dec(ember)?|mon|tue|wed|thu|fri|sat|sun|days?|hours?|minutes?|weeks?|months?|years?|ago|"
    r"updated|posted|published|on|at|am|pm|[\s,./:\-–—·|])+",
    re.I)
WORD = re.compile(r"\w+")


def clean_snippets(snippets: list[str], limit: int = MAX_SNIPPETS) -> list[str]:
    """Whitespace-normalised snippets minus boilerplate, date-only lines, very short ones and duplicates."""
    out, seen = [], set()
    for s in snippets:
        s = " ".join(str(s or "").split())
        if len(s) < MIN_CHARS or len(WORD.findall(s)) < MIN_WORDS:
            continue
        if BOILERPLATE.search(s) or DATEISH.fullmatch(s):
            continue
        key = " ".join(WORD.findall(s.lower()))
        if key in seen:
            continue
        seen.add(key)
        out.append(s)
        if len(out) == limit:
            break
    return out


class SerperRetriever:
    """POSTs {"q": query} to a Serper-compatible search endpoint and returns its organic results' snippets.

    The API key is read from the environment variable named by `api_key_env` and sent only as the X-API-KEY
    header; it is never printed, not even in error messages (those name the URL and the HTTP status only).
    """

    name = "serper"

    def __init__(self, url: str = "https://google.serper.dev/search", api_key_env: str = "SERPER_API_KEY",
                 timeout: float = 20.0, attempts: int = 2):
        key = os.environ.get(api_key_env)
        if not key:
            raise ValueError(f"serper retriever: environment variable {api_key_env} is not set")
        self.url, self.timeout, self.attempts = url, timeout, attempts
        self._key = key

    def search(self, query: str) -> list[str]:
        body = json.dumps({"q": query[:QUERY_CHARS]}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"X-API-KEY": self._key, "Content-Type": "application/json"})
        problem = ""
        for _ in range(self.attempts):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read())
                return [r.get("snippet", "") for r in data.get("organic", []) if isinstance(r, dict)]
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code}"
            except (urllib.error.URLError, OSError, ValueError) as err:
                problem = type(err).__name__
        print(f"serper: no results from {self.url} ({problem})", file=sys.stderr)
        return []


def read_corpus(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Passages from JSONL (one object per line, `field` holds the text), Parquet (column `field`) or plain text
    (one passage per non-blank line)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(path, None, field, "missing column")
        return [str(t) for t in table.column(field).to_pylist() if t]
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(path, line_no, None, f"not JSON: {err}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise DataError(path, line_no, field, "missing or not a string")
                docs.append(obj[field])
            else:
                docs.append(line.strip())
    if not docs:
        raise DataError(path, None, None, "corpus is empty")
    return docs


def _terms(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BM25Retriever:
    """Okapi BM25 (rank_bm25) over a local corpus; returns the best-scoring passages that share a term."""

    name = "bm25"

    def __init__(self, corpus: str | os.PathLike, field: str = "text", top_k: int = 10):
        from rank_bm25 import BM25Okapi

        self.docs = read_corpus(corpus, field)
        self.bm25 = BM25Okapi([_terms(d) or [""] for d in self.docs])
        self.top_k = top_k

    def search(self, query: str) -> list[str]:
        terms = _terms(query)
        if not terms:
            return []
        scores = self.bm25.get_scores(terms)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:self.top_k]
        query_terms = set(terms)
        return [self.docs[i] for i in order if query_terms & set(_terms(self.docs[i]))]


def make_retriever(kind: str | None, corpus: str | None = None, corpus_field: str = "text",
                   serper_url: str | None = None, serper_key_env: str | None = None):
    if kind in (None, "", "none"):
        return None
    if kind == "bm25":
        if not corpus:
            raise ValueError("bm25 retriever needs --corpus")
        return BM25Retriever(corpus, corpus_field)
    if kind == "serper":
        return SerperRetriever(serper_url or "https://google.serper.dev/search", serper_key_env or "SERPER_API_KEY")
    raise ValueError(f"unknown retriever {kind!r} (none, bm25, serper)")
