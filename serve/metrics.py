"""Prometheus metrics of one server (its own registry, so two apps in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from neodeploy.runtime.engine import EngineObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def outcome(reason: str) -> str:
    return {"eos": "stop"}.get(reason, reason)


class Metrics(EngineObserver):
    def __init__(self):
        self.mirrors: list[EngineObserver] = []  # e.g. Ray's metrics export, one per replica (serve/ray.py)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("neodeploy_requests", "Finished requests by outcome (stop, length, cancelled, error, "
                                "rejected_ + invalid, unauthorized, not_found, too_large, timeout, overloaded, unavailable)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("neodeploy_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("neodeploy_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("neodeploy_running_requests", "Sequences being prefilled or decoded", registry=r)
        self.waiting = Gauge("neodeploy_waiting_requests", "Requests queued for a slot", registry=r)
        self.ttft = Histogram("neodeploy_time_to_first_token_seconds", "Submit to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("neodeploy_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("neodeploy_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("neodeploy_step_seconds", "Time of one decode step", buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.prefix_queries = Counter("neodeploy_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                                      "cache", registry=r)
        self.prefix_hits = Counter("neodeploy_prefix_cache_hit_tokens", "Prompt tokens whose KV the prefix cache "
                                   "had", registry=r)
        self.prefix_bytes = Gauge("neodeploy_prefix_cache_bytes", "Bytes the prefix cache holds", registry=r)
        self.drafted = Counter("neodeploy_speculative_draft_tokens", "Tokens drafted by speculative decoding",
                               registry=r)
        self.accepted = Counter("neodeploy_speculative_accepted_tokens", "Drafted tokens the model accepted (the "
                                "acceptance rate is accepted / draft)", registry=r)

    def watch(self, engine) -> None:
        self.running.set_function(lambda: engine.running)
        self.waiting.set_function(lambda: engine.waiting)
        self.prefix_bytes.set_function(lambda: engine.prefix.bytes if engine.prefix is not None else 0)

    def prefix(self, query_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.inc(query_tokens)
        self.prefix_hits.inc(hit_tokens)

    def speculated(self, drafted: int, accepted: int) -> None:
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)

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
