"""Provenance: which part of an answer came from where.

The engine records, for every committed token, its origin (``speculation.drafters.Origin``):
copied from reference r at token offset o, copied from the prompt or from the answer so far,
drafted by the draft model, or the target's own token. This module turns that into what users
read, in characters of the answer text:

* segments (``provenance``): consecutive answer text of one origin -- ``copied`` (from source
  ``source``), ``prompt``, ``answer`` (repeats earlier answer text), ``draft_model``, ``target``;
* source spans (each source's ``spans``): answer ranges and the source-text ranges they equal --
  ``copied`` where the tokens were copied from that source (from its reference, or from its
  text in the prompt), ``matched`` where the target wrote the same words itself (found by a
  cheap alignment: >= ``MATCH_CHARS`` characters of answer text equal to a source's text).
  Every span is checked: ``answer[answer_start:answer_end] == source.text[source_start:
  source_end]``, character for character, or it is not reported. Spans never overlap.

Streaming sends each delta's segments with it (``OriginStream``); origins never change once
committed, so what was streamed is what the final ``provenance`` says.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .api import Source

MATCH_CHARS = 10       # characters of answer text a source must share to be "matched"
MIN_COPY_CHARS = 3     # non-blank characters a copied span needs to be cited (not a lone "." or newline)
COPY_KINDS = ("reference", "prompt")

# a token's origin as the pipeline keeps it: (label, source id or "", token offset in that source)
TokenOrigin = tuple[str, str, int]
_LABELS = {"reference": "copied", "prompt": "prompt", "output": "answer", "history": "history",
           "draft_model": "draft_model", "target": "target", "given": "target"}


def resolve(origin: tuple[str, int, int], reference_sources: Sequence[Source]) -> TokenOrigin:
    """An engine origin with its reference number resolved to a source id (``reference_sources``
    are the sources the request's references were made from, in order)."""
    kind, ref, off = origin
    if kind == "reference" and 0 <= ref < len(reference_sources):
        return ("reference", reference_sources[ref].id, off)
    return (kind, "", off)


def token_origins(origins: Sequence[tuple[str, int, int]], reference_sources: Sequence[Source]) -> list[TokenOrigin]:
    return [resolve(o, reference_sources) for o in origins]


def _segment(segments: list[dict[str, Any]], start: int, end: int, origin: TokenOrigin,
             source_index: dict[str, int]) -> None:
    label = _LABELS.get(origin[0], "target")
    source = source_index.get(origin[1]) if label == "copied" else None
    if label == "copied" and source is None:
        label = "target"      # copied from a chunk the answer does not list (cannot happen in one-shot)
    last = segments[-1] if segments else None
    if last is not None and last["answer_end"] == start and last["origin"] == label and last["source"] == source:
        last["answer_end"] = end
    else:
        segments.append({"answer_start": start, "answer_end": end, "origin": label, "source": source})


def segments(ends: Sequence[int], origins: Sequence[TokenOrigin], sources: Sequence[Source],
             text_len: int) -> list[dict[str, Any]]:
    """The answer's text, ``text_len`` characters, as segments of one origin each."""
    index = {s.id: i for i, s in enumerate(sources)}
    out: list[dict[str, Any]] = []
    prev = 0
    for end, origin in zip(ends, origins):
        end = min(end, text_len)
        if end > prev:
            _segment(out, prev, end, origin, index)
            prev = end
    return out


class OriginStream:
    """Segments of each streamed text delta, from the tokens committed so far. ``take`` is
    called with every delta in order, with the token ends and origins so far (engine origins
    when ``reference_sources`` is given, resolved ones otherwise); the concatenation of what
    it returns (merged at the joins) is ``segments`` of the whole answer. ``index``: each
    listed source's position by id (the caller may add to it as sources come into use)."""

    def __init__(self, index: dict[str, int], reference_sources: Sequence[Source] | None = None) -> None:
        self.index = index
        self.refs = reference_sources
        self.sent = 0
        self.tok = 0

    def take(self, delta: str, ends: Sequence[int], origins: Sequence[Any]) -> list[dict[str, Any]]:
        start, end = self.sent, self.sent + len(delta)
        self.sent = end
        out: list[dict[str, Any]] = []
        i = self.tok
        while i < min(len(ends), len(origins)):
            lo = ends[i - 1] if i else 0
            if lo >= end:
                break
            a, b = max(start, lo), min(end, ends[i])
            if b > a:
                origin = origins[i] if self.refs is None else resolve(origins[i], self.refs)
                _segment(out, a, b, origin, self.index)
            if ends[i] > end:
                break          # the rest of this token's text comes with a later delta
            i += 1
        self.tok = i
        return out


def char_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Per token of ``ids``, where its text ends in their decoded text."""
    from speculation.text import StopStringStreamer

    streamer = StopStringStreamer(tokenizer)
    for t in ids:
        streamer.push(t)
    return streamer.token_ends(len(ids))


def _located(answer: str, a: int, b: int, text: str, guess: int) -> int | None:
    """Where ``answer[a:b]`` is in ``text``: at ``guess`` when it is there (the usual case),
    else its nearest occurrence; None when it is not in the text."""
    piece = answer[a:b]
    if text.startswith(piece, guess):
        return guess
    after = text.find(piece, max(0, guess))
    before = text.rfind(piece, 0, max(0, guess) + len(piece))
    found = [p for p in (after, before) if p >= 0]
    return min(found, key=lambda p: abs(p - guess)) if found else None


def source_spans(answer: str, token_ids: Sequence[int], ends: Sequence[int], origins: Sequence[TokenOrigin],
                 sources: Sequence[Source], reference_ids: Callable[[Source], list[int]],
                 tokenizer: Any) -> list[list[dict[str, Any]]]:
    """Per source, the answer ranges that equal its text: copied runs first, then matched ones
    among the tokens left (see the module docstring)."""
    n = min(len(token_ids), len(ends), len(origins))
    ends = [min(e, len(answer)) for e in ends[:n]]
    index = {s.id: i for i, s in enumerate(sources)}
    spans: list[list[dict[str, Any]]] = [[] for _ in sources]
    covered = [False] * n
    src_ids: dict[int, list[int]] = {}
    src_ends: dict[int, list[int]] = {}

    def start_of(i: int) -> int:
        """Where token ``i``'s text starts in the answer."""
        return ends[i - 1] if i else 0

    def ids_of(si: int) -> list[int]:
        if si not in src_ids:
            src_ids[si] = reference_ids(sources[si])
        return src_ids[si]

    def record(si: int, i: int, j: int, source_start: int, kind: str) -> dict[str, Any]:
        """Answer tokens [i, j) equal the text of source ``si`` from ``source_start`` on."""
        a, b = start_of(i), ends[j - 1]
        span = {"answer_start": a, "answer_end": b, "source_start": source_start,
                "source_end": source_start + (b - a), "kind": kind}
        spans[si].append(span)
        for k in range(i, j):
            covered[k] = True
        return span

    # copied: runs of tokens copied from consecutive offsets of one source's reference, placed
    # where the reference's offset is in the source text (or the nearest place the text is)
    copies: list[tuple[int, int, dict[str, Any]]] = []     # (source, token after the run, span)
    i = 0
    while i < n:
        kind, sid, off = origins[i]
        si = index.get(sid) if kind == "reference" else None
        if si is None:
            i += 1
            continue
        j = i + 1
        while j < n and origins[j] == ("reference", sid, off + (j - i)):
            j += 1
        a, b = start_of(i), ends[j - 1]
        if len(answer[a:b].strip()) >= MIN_COPY_CHARS:
            if si not in src_ends:
                src_ends[si] = char_ends(tokenizer, ids_of(si))
            at = _located(answer, a, b, sources[si].text, src_ends[si][off - 1] if off else 0)
            if at is not None:
                copies.append((si, j, record(si, i, j, at, "copied")))
        i = j
    # the target's tokens right after a copy that go on with the source's text (the bonus token
    # after an accepted draft, a correction that happens to equal it): matched, however short
    for si, j, copy in copies:
        text, at = sources[si].text, copy["source_end"]
        k = j
        while k < n and not covered[k] and ends[k] > start_of(k):
            if not text.startswith(answer[start_of(k):ends[k]], at + (start_of(k) - ends[j - 1])):
                break
            k += 1
        if k > j:
            record(si, j, k, at, "matched")
    # matched: the answer text left (the target's own words, prompt copies) where it equals a
    # source's text for >= MATCH_CHARS characters, found from token starts by a character
    # shingle index of the sources and extended as far as the text stays equal
    grams: dict[str, tuple[int, int]] = {}
    for si, src in enumerate(sources):
        for p in range(len(src.text) - MATCH_CHARS + 1):
            grams.setdefault(src.text[p:p + MATCH_CHARS], (si, p))
    i = 0
    while i < n:
        if covered[i]:
            i += 1
            continue
        a = start_of(i)
        j = i                        # the run of uncovered tokens from i
        while j < n and not covered[j]:
            j += 1
        limit = ends[j - 1]
        hit = grams.get(answer[a:a + MATCH_CHARS]) if limit - a >= MATCH_CHARS else None
        if hit is None:
            i += 1
            continue
        si, p = hit
        text = sources[si].text
        b = a + MATCH_CHARS
        while b < limit and p + (b - a) < len(text) and text[p + (b - a)] == answer[b]:
            b += 1
        k = i                        # the span ends where a token does (no half words)
        while k < j and ends[k] <= b:
            k += 1
        if k == i or ends[k - 1] - a < MATCH_CHARS:
            i += 1
            continue
        kind = "copied" if all(origins[t][0] in COPY_KINDS for t in range(i, k)) else "matched"
        record(si, i, k, p, kind)
        i = k
    for per_source in spans:
        per_source.sort(key=lambda s: s["answer_start"])
    return spans


def attribute(answer: str, token_ids: Sequence[int], ends: Sequence[int], origins: Sequence[TokenOrigin],
              sources: Sequence[Source], reference_ids: Callable[[Source], list[int]],
              tokenizer: Any) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """(each source's spans, the answer's segments) of one answer."""
    return (source_spans(answer, token_ids, ends, origins, sources, reference_ids, tokenizer),
            segments(ends, origins, sources, len(answer)))
