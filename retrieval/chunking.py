"""Chunking by tokens of the *generator's* tokenizer.

Chunks are cut in generator tokens because their token ids are what reference drafting copies
and what the prompt budget is counted in. Each chunk keeps its token ids (stored with the
chunk) and the text decoded from exactly those ids, so ``text`` and ``token_ids`` never
disagree. The id is a content hash of (document key, text): stable across runs and machines,
so re-ingesting unchanged content is a no-op, and a changed document replaces only its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from .corpus import Document


class TokenizerLike(Protocol):
    """What retrieval needs from the generator's tokenizer (a HF tokenizer satisfies it)."""

    name_or_path: str

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_key: str
    title: str
    source: str
    text: str
    token_ids: list[int]


def chunk_id(doc_key: str, text: str) -> str:
    """Stable id: 16 hex digits of sha256(doc_key NUL text)."""
    return hashlib.sha256(f"{doc_key}\x00{text}".encode("utf-8")).hexdigest()[:16]


def chunk_document(doc: Document, tokenizer: Any, size: int = 256, overlap: int = 32) -> Iterator[Chunk]:
    """Windows of ``size`` tokens advancing by ``size - overlap``; the last window may be short.

    Windows that only repeat the overlap of the previous one are not emitted.
    """
    text = doc.text.strip()
    if not text:
        return
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    step = size - overlap
    start = 0
    seen: set[str] = set()
    while start < len(ids):
        window = ids[start : start + size]
        piece = tokenizer.decode(window)
        cid = chunk_id(doc.doc_key, piece)
        if cid not in seen and piece.strip():
            seen.add(cid)
            yield Chunk(cid, doc.doc_key, doc.title, doc.source, piece, window)
        if start + size >= len(ids):
            break
        start += step
