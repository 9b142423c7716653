"""Service metrics, exposed by prometheus_client.

Kept by each Ingress replica for the requests it handled (a scrape of /metrics reaches one
replica; with several, sum them in Prometheus). Each ServiceMetrics has a CollectorRegistry of
its own, not prometheus_client's global one: the state stays per object, so several apps in one
process (the tests build many) count apart and never collide on a metric name.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.api import AskResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROWS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class ServiceMetrics:
    """Counters, histograms and gauges of the endpoint (prometheus_client's are thread-safe)."""

    content_type = CONTENT_TYPE_LATEST    # the format ``render`` writes

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._requests = Counter("specrag_requests_total", "HTTP requests by endpoint and status code.",
                                 ["endpoint", "status"], registry=r)
        self._errors = Counter("specrag_errors_total", "Failed requests by error type.", ["type"], registry=r)
        self._latency = Histogram("specrag_request_latency_seconds", "Request latency (to the last byte).",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self._ttft = Histogram("specrag_time_to_first_token_seconds", "Streaming: time to the first content chunk.",
                               buckets=LATENCY_BUCKETS, registry=r)
        # per request: the mean rows of the engine steps it took part in, and their mean seconds
        self._rows = Histogram("specrag_engine_batch_rows",
                               "Per request: mean sequences in the engine steps (target forwards) it took part in.",
                               buckets=ROWS_BUCKETS, registry=r)
        self._step = Histogram("specrag_engine_step_seconds",
                               "Per request: mean wall seconds of the engine steps it took part in.",
                               buckets=STEP_BUCKETS, registry=r)
        # the cost model: predicted vs measured seconds of the steps; acceptance by draft position
        self._predicted = Counter("specrag_engine_predicted_seconds_total",
                                  "The cost model's predicted seconds of the engine steps requests took part in.",
                                  registry=r)
        self._measured = Counter("specrag_engine_measured_seconds_total",
                                 "Measured seconds of the same steps (compare with the predicted total).", registry=r)
        self._reached = Counter("specrag_draft_position_reached_total",
                                "Drafts that reached a draft position (1 = the first drafted token), by drafter.",
                                ["drafter", "position"], registry=r)
        self._accepted_at = Counter("specrag_draft_position_accepted_total",
                                    "Drafts whose token at that position was accepted, by drafter (accepted / "
                                    "reached = the conditional acceptance the cost model uses).",
                                    ["drafter", "position"], registry=r)
        self._completion_tokens = Counter("specrag_tokens_generated_total", "Completion tokens generated.", registry=r)
        self._prompt_tokens = Counter("specrag_prompt_tokens_total", "Prompt tokens processed.", registry=r)
        self._forwards = Counter("specrag_target_forwards_total", "Forward passes of the target model.", registry=r)
        self._drafted = Counter("specrag_draft_tokens_total", "Tokens proposed by drafters.", registry=r)
        self._accepted = Counter("specrag_accepted_draft_tokens_total", "Drafted tokens accepted by the verifier.",
                                 registry=r)
        self._speculated = Counter("specrag_retrievals_speculated_total",
                                   "Retrievals answered from the local cache (RaLMSpec).", registry=r)
        self._verified = Counter("specrag_retrieval_speculation_hits_total",
                                 "Speculated retrievals confirmed by the real retriever.", registry=r)
        # ratios of the totals, computed at each scrape from the counters above
        for name, help_, num, den in (
            ("specrag_mean_accepted_tokens_per_forward",
             "Completion tokens per target forward, over all requests (1.0 = no speedup).",
             self._completion_tokens, self._forwards),
            ("specrag_draft_acceptance_rate", "Accepted / drafted tokens, over all requests.",
             self._accepted, self._drafted),
            ("specrag_retrieval_speculation_hit_rate", "Confirmed (verified) / speculated retrievals.",
             self._verified, self._speculated),
        ):
            Gauge(name, help_, registry=r).set_function(partial(_ratio, num, den))

    # -- recording -----------------------------------------------------------------------------
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def result(self, result: AskResult) -> None:
        stats = result.stats or {}
        forwards = _as_float(stats.get("target_forwards"))
        rows = _as_float(stats.get("mean_rows_per_step"))
        step = _as_float(stats.get("mean_step_seconds"))
        predicted = _as_float(stats.get("predicted_seconds"))
        if rows > 0:
            self._rows.observe(rows)
            self._step.observe(step)
        if predicted > 0:
            self._predicted.inc(predicted)
            self._measured.inc(step * forwards)
        by_drafter = stats.get("by_drafter") if isinstance(stats.get("by_drafter"), dict) else {}
        for name, d in by_drafter.items():
            if not isinstance(d, dict):
                continue
            for i, (reached, acc) in enumerate(zip(d.get("reached") or [], d.get("accepted_at") or [])):
                self._reached.labels(str(name), str(i + 1)).inc(_as_float(reached))
                self._accepted_at.labels(str(name), str(i + 1)).inc(_as_float(acc))
        self._completion_tokens.inc(result.completion_tokens)
        self._prompt_tokens.inc(result.prompt_tokens)
        self._forwards.inc(forwards)
        self._drafted.inc(_as_float(stats.get("draft_tokens")))
        self._accepted.inc(_as_float(stats.get("accepted_tokens")))
        # the pipeline's {"real", "speculated", "verified", "mismatched", "batches"}: a hit is a
        # verified speculation. Not speculated - mismatched: the strides speculated after a
        # mismatch are dropped unverified, and they are no hits either.
        retrievals = stats.get("retrievals") if isinstance(stats.get("retrievals"), dict) else {}
        self._speculated.inc(_as_float(retrievals.get("speculated")))
        self._verified.inc(_as_float(retrievals.get("verified")))

    # -- exposition ----------------------------------------------------------------------------
    def render(self) -> bytes:
        """The exposition of this object's registry, in ``content_type``'s format."""
        return generate_latest(self.registry)


def _value(counter: Counter) -> float:
    """An unlabelled counter's value, through the collector interface (the one prometheus_client
    offers for reading)."""
    return next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))


def _ratio(num: Counter, den: Counter) -> float:
    d = _value(den)
    return _value(num) / d if d else 0.0


def _as_float(x: Any) -> float:
    try:
        return float(x or 0)
    except (TypeError, ValueError):
        return 0.0
