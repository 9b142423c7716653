"""The index manifest: what an index was built with, checked whenever it is opened.

A FAISS index is meaningless with another embedding model, and stored token ids are
meaningless with another generator tokenizer; the manifest records both so a mismatch is a
clear :class:`~retrieval.errors.IndexMismatchError` instead of silently wrong results.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import IndexMismatchError, IndexNotFoundError

MANIFEST_NAME = "manifest.json"
IDS_NAME = "ids.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    index_name: str
    embedding_model: str
    embedding_dim: int
    index_type: str
    tokenizer: str
    chunk_tokens: int
    chunk_overlap: int
    chunk_count: int
    corpus_fingerprint: str
    metric: str = "inner_product"
    ivf_nlist: int | None = None
    hnsw_m: int | None = None
    format_version: int = FORMAT_VERSION

    def save(self, index_dir: Path) -> None:
        tmp = index_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, index_dir / MANIFEST_NAME)

    @classmethod
    def load(cls, index_dir: str | Path) -> "Manifest":
        path = Path(index_dir) / MANIFEST_NAME
        if not path.is_file():
            raise IndexNotFoundError(
                f"no index in {index_dir} (missing {MANIFEST_NAME}); build one with "
                f"`specrag ingest PATH|python-docs --index {index_dir}`"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise IndexNotFoundError(f"unreadable index manifest {path}: {exc}") from exc
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(
                f"index {index_dir} has format {data.get('format_version')}, this version reads "
                f"{FORMAT_VERSION}; re-ingest into a new --index directory"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def tokenizer_name(tokenizer: object) -> str:
    """Last path component of ``name_or_path`` (or of the string given): the same tokenizer
    cached at different paths on two machines must compare equal."""
    if isinstance(tokenizer, str):
        name = tokenizer
    else:
        name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return os.path.basename(os.path.normpath(name)) if name else name


def fingerprint(sorted_ids: list[str]) -> str:
    h = hashlib.sha256()
    for cid in sorted_ids:
        h.update(cid.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def write_ids(index_dir: Path, ids: list[str]) -> None:
    tmp = index_dir / (IDS_NAME + ".tmp")
    tmp.write_text(json.dumps(ids))
    os.replace(tmp, index_dir / IDS_NAME)


def read_ids(index_dir: Path) -> list[str]:
    return json.loads((index_dir / IDS_NAME).read_text())
