"""Sparse index: BM25 through ``bm25s`` (Lucene's BM25 variant, k1=1.5, b=0.75).

The corpus is tokenized here (lower-cased words of two or more characters, English stop words
removed -- bm25s' default analyser) into ids, in batches, so building never holds the texts;
the index is bm25s' precomputed sparse score matrix. Queries are scored with
``get_scores_from_ids``: one array of scores over all chunks, from which both top-k and the
*local* scores of any chunk subset are read -- so local scoring is the index's own metric.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

logger = logging.getLogger(__name__)

BM25_DIR = "bm25"
_WORD = re.compile(r"(?u)\b\w\w+\b")
_STOP = frozenset(STOPWORDS_EN)


def analyse(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


class BM25Index:
    """A bm25s index aligned with the dense rows (row r = r-th sorted chunk id)."""

    def __init__(self, model: bm25s.BM25) -> None:
        self.model = model
        self.vocab: dict[str, int] = model.vocab_dict
        self.num_docs = int(model.scores["num_docs"])

    @classmethod
    def build(cls, text_batches: Iterable[list[str]]) -> "BM25Index":
        vocab: dict[str, int] = {}
        corpus_ids: list[list[int]] = []
        for texts in text_batches:
            for text in texts:
                ids = []
                for w in analyse(text):
                    tid = vocab.get(w)
                    if tid is None:
                        tid = vocab[w] = len(vocab)
                    ids.append(tid)
                corpus_ids.append(ids)
        model = bm25s.BM25()
        bm25s_logger = logging.getLogger("bm25s")  # bm25s sets itself to DEBUG: quiet it here
        level = bm25s_logger.level
        bm25s_logger.setLevel(logging.WARNING)
        try:
            model.index((corpus_ids, vocab), show_progress=False)
        finally:
            bm25s_logger.setLevel(level)
        return cls(model)

    def save(self, index_dir: Path) -> None:
        self.model.save(str(index_dir / BM25_DIR))

    @classmethod
    def load(cls, index_dir: Path) -> "BM25Index":
        return cls(bm25s.BM25.load(str(index_dir / BM25_DIR), mmap=False))

    def query_ids(self, query: str) -> list[int]:
        return [self.vocab[w] for w in analyse(query) if w in self.vocab]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk (float32, length N); zeros when no query word is indexed."""
        ids = self.query_ids(query)
        if not ids:
            return np.zeros(self.num_docs, dtype=np.float32)
        return np.asarray(self.model.get_scores_from_ids(ids), dtype=np.float32)

    def top_k(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the k best chunks with a positive score, best first, ties by row."""
        s = self.scores(query)
        return top_k_rows(s, k)


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    cand = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    # the k-th score may be tied with rows outside `cand`: include every row tied with it
    kth = scores[cand].min()
    cand = np.union1d(cand, np.flatnonzero(scores == kth)) if k < len(scores) else cand
    order = np.lexsort((cand, -scores[cand]))[:k]
    rows = cand[order]
    rows = rows[scores[rows] > 0]
    return scores[rows], rows.astype(np.int64)
