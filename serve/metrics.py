"""The server's metrics: one declaration of every series (`SERIES`), exported through Prometheus on /metrics
(`Metrics`, its own registry, so two apps in one process never share counters) and, on Ray, mirrored through Ray's
metrics export (serve/ray.py's RayMetrics builds the same series from `SERIES`)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from neodeploy.runtime.engine import EngineObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Series:
    attr: str  # the attribute that holds it on Metrics and RayMetrics
    kind: str  # counter | gauge | histogram
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only


SERIES = (
    Series("requests", "counter", "neodeploy_requests", "Finished requests by outcome (stop, length, cancelled, error, "
           "rejected_ + invalid, unauthorized, not_found, too_large, timeout, overloaded, unavailable)", ("outcome",)),
    Series("prompt_tokens", "counter", "neodeploy_prompt_tokens", "Prompt tokens of admitted requests"),
    Series("generated_tokens", "counter", "neodeploy_generation_tokens", "Generated tokens"),
    Series("running", "gauge", "neodeploy_running_requests", "Sequences being prefilled or decoded"),
    Series("waiting", "gauge", "neodeploy_waiting_requests", "Requests queued for a slot"),
    Series("ttft", "histogram", "neodeploy_time_to_first_token_seconds", "Submit to first token",
           buckets=LATENCY_BUCKETS),
    Series("itl", "histogram", "neodeploy_inter_token_latency_seconds", "Between consecutive tokens of a request",
           buckets=LATENCY_BUCKETS),
    Series("batch", "histogram", "neodeploy_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS),
    Series("step_seconds", "histogram", "neodeploy_step_seconds", "Time of one decode step", buckets=LATENCY_BUCKETS),
    Series("prefix_queries", "counter", "neodeploy_prefix_cache_query_tokens",
           "Prompt tokens looked up in the prefix cache"),
    Series("prefix_hits", "counter", "neodeploy_prefix_cache_hit_tokens", "Prompt tokens whose KV the prefix cache had"),
    Series("prefix_bytes", "gauge", "neodeploy_prefix_cache_bytes", "Bytes the prefix cache holds"),
    Series("drafted", "counter", "neodeploy_speculative_draft_tokens", "Tokens drafted by speculative decoding"),
    Series("accepted", "counter", "neodeploy_speculative_accepted_tokens",
           "Drafted tokens the model accepted (the acceptance rate is accepted / draft)"),
)


def outcome(reason: str) -> str:
    return {"eos": "stop"}.get(reason, reason)


def _prometheus(series: Series, registry: CollectorRegistry):
    if series.kind == "histogram":
        return Histogram(series.name, series.help, series.labels, buckets=series.buckets, registry=registry)
    return {"counter": Counter, "gauge": Gauge}[series.kind](series.name, series.help, series.labels, registry=registry)


class Metrics(EngineObserver):
    def __init__(self):
        self.mirrors: list[EngineObserver] = []  # e.g. Ray's metrics export, one per replica (serve/ray.py)
        self.registry = CollectorRegistry()
        for series in SERIES:
            setattr(self, series.attr, _prometheus(series, self.registry))

    def watch(self, engine) -> None:
        self.running.set_function(lambda: engine.running)
        self.waiting.set_function(lambda: engine.waiting)
        self.prefix_bytes.set_function(lambda: engine.prefix.bytes if engine.prefix is not None else 0)

    def prefix(self, query_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.inc(query_tokens)
        self.prefix_hits.inc(hit_tokens)
        for m in self.mirrors:
            m.prefix(query_tokens, hit_tokens)

    def speculated(self, drafted: int, accepted: int) -> None:
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        for m in self.mirrors:
            m.speculated(drafted, accepted)

    # EngineObserver, called from the engine thread
    def step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)
        self.step_seconds.observe(seconds)
        for m in self.mirrors:
            m.step(batch_size, seconds)

    def token(self, handle, first: bool, seconds: float) -> None:
        (self.ttft if first else self.itl).observe(seconds)
        if first:
            self.prompt_tokens.inc(len(handle.prompt_ids))
        for m in self.mirrors:
            m.token(handle, first, seconds)

    def finished(self, handle, reason: str) -> None:
        self.requests.labels(outcome(reason)).inc()
        self.generated_tokens.inc(len(handle.sequence.text.output_ids))
        for m in self.mirrors:
            m.finished(handle, reason)

    def rejected(self, why: str | None) -> None:
        if why is None:
            return
        self.requests.labels(f"rejected_{why}").inc()
        for m in self.mirrors:
            m.finished(None, f"rejected_{why}")

    def render(self) -> bytes:
        return generate_latest(self.registry)
