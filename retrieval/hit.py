"""The one record of a retrieved chunk, shared by every layer above (``pipeline.api.Source`` is
this class): light to import, plain to pickle across Ray."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class Hit:
    """One retrieved chunk. ``token_ids`` are its generator-tokenized text, the drafting
    reference; None when it came from elsewhere (the pipeline tokenizes it on first use)."""

    id: str
    title: str
    source: str
    score: float
    text: str
    token_ids: list[int] | None = None

    def public(self) -> dict[str, Any]:
        """The fields shown to users (CLI ``--json``, HTTP ``sources``): no token ids (never
        copied: a source's ids are hundreds of numbers)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token_ids"}
