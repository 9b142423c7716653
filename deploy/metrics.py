"""Service metrics in the Prometheus text exposition format (version 0.0.4).

Kept by each Ingress replica for the requests it handled (a scrape of /metrics reaches one
replica; with several, sum them in Prometheus). Written by hand, not with prometheus_client,
to keep the state per object (no global registry) and the dependency list short.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from pipeline.api import AskResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROWS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer():
        return str(int(x))
    return repr(float(x))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1


class ServiceMetrics:
    """Counters and histograms of the endpoint; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._errors: dict[str, int] = {}
        self._latency: dict[str, _Histogram] = {}
        self._ttft = _Histogram(LATENCY_BUCKETS)
        # per request: the mean rows of the engine steps it took part in, and their mean seconds
        self._rows = _Histogram(ROWS_BUCKETS)
        self._step = _Histogram(STEP_BUCKETS)
        # the cost model: predicted vs measured seconds of the steps; acceptance by draft position
        self._cost = {"predicted": 0.0, "measured": 0.0}
        self._positions: dict[tuple[str, int], list[float]] = {}   # (drafter, position) -> [reached, accepted]
        self._totals = {
            "completion_tokens": 0.0, "prompt_tokens": 0.0, "target_forwards": 0.0,
            "draft_tokens": 0.0, "accepted_tokens": 0.0,
            "retrievals_speculated": 0.0, "retrieval_speculation_hits": 0.0,
        }

    # -- recording -----------------------------------------------------------------------------
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft.observe(seconds)

    def result(self, result: AskResult) -> None:
        stats = result.stats or {}
        forwards = _as_float(stats.get("target_forwards"))
        drafted = _as_float(stats.get("draft_tokens"))
        accepted = _as_float(stats.get("accepted_tokens"))
        retr = stats.get("retrievals") or stats.get("retrieval") or {}
        speculated = _as_float(_first(retr, "speculated", "speculations"))
        mismatched = _as_float(_first(retr, "mismatched", "mismatches"))
        hits = _first(retr, "hits", "speculation_hits", "correct")
        hits_f = _as_float(hits) if hits is not None else max(speculated - mismatched, 0.0)
        rows = _as_float(stats.get("mean_rows_per_step"))
        step = _as_float(stats.get("mean_step_seconds"))
        predicted = _as_float(stats.get("predicted_seconds"))
        by_drafter = stats.get("by_drafter") if isinstance(stats.get("by_drafter"), dict) else {}
        with self._lock:
            if rows > 0:
                self._rows.observe(rows)
                self._step.observe(step)
            if predicted > 0:
                self._cost["predicted"] += predicted
                self._cost["measured"] += step * forwards
            for name, d in by_drafter.items():
                if not isinstance(d, dict):
                    continue
                for i, (reached, acc) in enumerate(zip(d.get("reached") or [], d.get("accepted_at") or [])):
                    cell = self._positions.setdefault((str(name), i + 1), [0.0, 0.0])
                    cell[0] += _as_float(reached)
                    cell[1] += _as_float(acc)
            t = self._totals
            t["completion_tokens"] += result.completion_tokens
            t["prompt_tokens"] += result.prompt_tokens
            t["target_forwards"] += forwards
            t["draft_tokens"] += drafted
            t["accepted_tokens"] += accepted
            t["retrievals_speculated"] += speculated
            t["retrieval_speculation_hits"] += hits_f

    # -- exposition ----------------------------------------------------------------------------
    def render(self) -> str:
        with self._lock:
            lines: list[str] = []

            def head(name: str, kind: str, help_: str) -> None:
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")

            head("specrag_requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (endpoint, status), n in sorted(self._requests.items()):
                lines.append(f"specrag_requests_total{_labels({'endpoint': endpoint, 'status': status})} {n}")
            head("specrag_errors_total", "counter", "Failed requests by error type.")
            for kind, n in sorted(self._errors.items()):
                lines.append(f"specrag_errors_total{_labels({'type': kind})} {n}")
            head("specrag_request_latency_seconds", "histogram", "Request latency (to the last byte).")
            for endpoint, h in sorted(self._latency.items()):
                self._histogram(lines, "specrag_request_latency_seconds", h, {"endpoint": endpoint})
            head("specrag_time_to_first_token_seconds", "histogram", "Streaming: time to the first content chunk.")
            self._histogram(lines, "specrag_time_to_first_token_seconds", self._ttft, {})
            head("specrag_engine_batch_rows", "histogram",
                 "Per request: mean sequences in the engine steps (target forwards) it took part in.")
            self._histogram(lines, "specrag_engine_batch_rows", self._rows, {})
            head("specrag_engine_step_seconds", "histogram",
                 "Per request: mean wall seconds of the engine steps it took part in.")
            self._histogram(lines, "specrag_engine_step_seconds", self._step, {})
            head("specrag_engine_predicted_seconds_total", "counter",
                 "The cost model's predicted seconds of the engine steps requests took part in.")
            lines.append(f"specrag_engine_predicted_seconds_total {_num(self._cost['predicted'])}")
            head("specrag_engine_measured_seconds_total", "counter",
                 "Measured seconds of the same steps (compare with the predicted total).")
            lines.append(f"specrag_engine_measured_seconds_total {_num(self._cost['measured'])}")
            head("specrag_draft_position_reached_total", "counter",
                 "Drafts that reached a draft position (1 = the first drafted token), by drafter.")
            for (name, pos), (reached, _) in sorted(self._positions.items()):
                lines.append(f"specrag_draft_position_reached_total{_labels({'drafter': name, 'position': str(pos)})} "
                             f"{_num(reached)}")
            head("specrag_draft_position_accepted_total", "counter",
                 "Drafts whose token at that position was accepted, by drafter (accepted / reached = the "
                 "conditional acceptance the cost model uses).")
            for (name, pos), (_, acc) in sorted(self._positions.items()):
                lines.append(f"specrag_draft_position_accepted_total{_labels({'drafter': name, 'position': str(pos)})} "
                             f"{_num(acc)}")
            t = self._totals
            for name, key, help_ in (
                ("specrag_tokens_generated_total", "completion_tokens", "Completion tokens generated."),
                ("specrag_prompt_tokens_total", "prompt_tokens", "Prompt tokens processed."),
                ("specrag_target_forwards_total", "target_forwards", "Forward passes of the target model."),
                ("specrag_draft_tokens_total", "draft_tokens", "Tokens proposed by drafters."),
                ("specrag_accepted_draft_tokens_total", "accepted_tokens", "Drafted tokens accepted by the verifier."),
                ("specrag_retrievals_speculated_total", "retrievals_speculated", "Retrievals answered from the local cache (RaLMSpec)."),
                ("specrag_retrieval_speculation_hits_total", "retrieval_speculation_hits", "Speculated retrievals confirmed by the real retriever."),
            ):
                head(name, "counter", help_)
                lines.append(f"{name} {_num(t[key])}")
            head("specrag_mean_accepted_tokens_per_forward", "gauge",
                 "Completion tokens per target forward, over all requests (1.0 = no speedup).")
            lines.append("specrag_mean_accepted_tokens_per_forward "
                         + _num(t["completion_tokens"] / t["target_forwards"] if t["target_forwards"] else 0.0))
            head("specrag_draft_acceptance_rate", "gauge", "Accepted / drafted tokens, over all requests.")
            lines.append("specrag_draft_acceptance_rate "
                         + _num(t["accepted_tokens"] / t["draft_tokens"] if t["draft_tokens"] else 0.0))
            head("specrag_retrieval_speculation_hit_rate", "gauge", "Confirmed / speculated retrievals.")
            lines.append("specrag_retrieval_speculation_hit_rate "
                         + _num(t["retrieval_speculation_hits"] / t["retrievals_speculated"]
                                if t["retrievals_speculated"] else 0.0))
            return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram(lines: list[str], name: str, h: _Histogram, labels: dict[str, str]) -> None:
        for b, n in zip(h.buckets, h.counts):
            lines.append(f"{name}_bucket{_labels({**labels, 'le': _num(b)})} {n}")
        lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h.count}")
        lines.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
        lines.append(f"{name}_count{_labels(labels)} {h.count}")


def _first(d: Any, *keys: str) -> Any:
    if not isinstance(d, dict):
        return None
    for k in keys:
        if k in d:
            return d[k]
    return None


def _as_float(x: Any) -> float:
    try:
        return float(x or 0)
    except (TypeError, ValueError):
        return 0.0
