"""The pipeline's public data types: what callers (CLI, Ray Serve deployments, batch) pass in
and get back. Plain dataclasses so they cross process boundaries (Ray pickles them) unchanged.

Contract used by ``deploy``:

    pipe = RAGPipeline(PipelineConfig(...))            # loads models + index (pipeline/rag.py)
    pipe.retrieve(["q1", "q2"], k=4, retriever="dense") -> list[list[Source]]
    pipe.generate(AskRequest(...), sources, on_text=cb) -> AskResult   # one-shot, given sources
    pipe.answer(AskRequest(...), on_text=cb)            -> AskResult   # retrieve + generate
                                                                     # (iterative when asked)
``on_text`` receives text deltas as tokens are committed; their concatenation equals
``AskResult.answer``. Each delta is a :class:`TextDelta`: a ``str`` that also carries the
provenance segments of its text (``pipeline/provenance.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from retrieval.hit import Hit as Source  # one record for a retrieved chunk, in every layer


@dataclass
class RetrievalOptions:
    k: int = 4
    retriever: Literal["dense", "bm25", "hybrid"] = "dense"
    iterative: bool = False
    stride: int = 4                       # iterative: re-retrieve every `stride` tokens
    query_tokens: int = 32                # iterative: query = last `query_tokens` tokens
    speculation_stride: int | Literal["auto"] = "auto"   # RaLMSpec: strides per verification
    async_verification: bool = True
    prefetch: int = 20


# the engine's drafters (speculation.engine.DRAFTERS), as a type for validated configs and requests
DrafterName = Literal["reference", "tree", "prompt_lookup", "draft_model"]


@dataclass
class SpeculationOptions:
    enabled: bool = True
    max_draft_tokens: int | None = None   # None: the engine's default / adaptive
    # drafters in order of preference ("reference", "tree", "prompt_lookup", "draft_model");
    # None: the engine's (PipelineConfig.drafters)
    drafters: tuple[str, ...] | None = None


@dataclass
class AskRequest:
    question: str
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    retrieval: RetrievalOptions = field(default_factory=RetrievalOptions)
    speculation: SpeculationOptions = field(default_factory=SpeculationOptions)


class TextDelta(str):
    """A streamed piece of the answer, with ``provenance``: its segments ({answer_start,
    answer_end, origin, source}, in characters of the whole answer). Still a plain ``str`` to
    everything that only wants the text."""

    provenance: list[dict[str, Any]]

    def __new__(cls, text: str, provenance: list[dict[str, Any]] | None = None) -> "TextDelta":
        obj = super().__new__(cls, text)
        obj.provenance = list(provenance or [])
        return obj

    def __reduce__(self) -> Any:          # crosses Ray's process boundaries with its provenance
        return (TextDelta, (str(self), self.provenance))


@dataclass
class AskResult:
    answer: str
    token_ids: list[int]
    sources: list[Source]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    # {"retrievals": {...}, "prefills", "target_forwards", "mean_accepted_per_forward",
    #  "draft_tokens", "accepted_tokens", "by_drafter": {...}, "seconds": {...}}
    stats: dict[str, Any] = field(default_factory=dict)
    # per source (parallel to ``sources``): the answer ranges equal to its text,
    # [{answer_start, answer_end, source_start, source_end, kind: copied|matched}]
    spans: list[list[dict[str, Any]]] = field(default_factory=list)
    # the answer as segments of one origin: [{answer_start, answer_end, origin, source}], origin
    # copied (from sources[source]) | prompt | answer | history (an earlier answer's words) |
    # draft_model | target
    provenance: list[dict[str, Any]] = field(default_factory=list)
    # iterative mode: the chunk each stride was generated with, [{answer_start, answer_end, source}]
    strides: list[dict[str, Any]] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def public_sources(self) -> list[dict[str, Any]]:
        """The sources as users see them (CLI ``--json``, HTTP, batch output): each one's public
        fields and its ``spans`` in this answer."""
        return [{**s.public(), "spans": list(self.spans[i]) if i < len(self.spans) else []}
                for i, s in enumerate(self.sources)]

    def public_provenance(self) -> dict[str, Any]:
        """``provenance`` (the answer's segments) and, in iterative mode, ``strides``."""
        return {"provenance": list(self.provenance), **({"strides": list(self.strides)} if self.strides else {})}


# Stages (implemented in pipeline/rag.py), so that Ray Serve can put retrieval and generation
# in separate deployments:
#   RetrievalStage(config).retrieve(questions, k, retriever) -> list[list[Source]]
#   GenerationStage(config, retrieval=None).generate(request, sources, on_text=None) -> AskResult
#   GenerationStage.answer(request, on_text=None) -> AskResult   (needs `retrieval`; iterative
#                                                                 mode retrieves inside the loop)
#   RAGPipeline(config) = both stages in one process: .retrieve, .generate, .answer
