"""One declaration of the server's metric series, used by /metrics and by Ray's metrics export alike."""

from __future__ import annotations

import sys
import types

import pytest

pytest.importorskip("prometheus_client")

from neodeploy.serve.metrics import SERIES, Metrics  # noqa: E402


def test_prometheus_exports_every_declared_series():
    text = Metrics().render().decode()
    for series in SERIES:
        assert f"# HELP {series.name}" in text and series.help in text  # counters gain _total
        assert f"# TYPE {series.name} {series.kind}" in text.replace("_total ", " ")


def test_ray_mirrors_the_same_series_and_events(monkeypatch):
    made = {}

    class Fake:
        def __init__(self, name, description="", tag_keys=(), boundaries=None):
            made[name] = (type(self).__name__.lower(), description, tag_keys, boundaries)
            self.calls = []

        def inc(self, value=1.0, tags=None):
            if value <= 0:  # as ray.util.metrics.Counter.inc: a miss (0 hit tokens) must not be sent
                raise ValueError(f"value must be >0, got {value}")
            self.calls.append(("inc", value, tags))

        def set(self, value, tags=None):
            self.calls.append(("set", value, tags))

        def observe(self, value, tags=None):
            self.calls.append(("observe", value, tags))

    fake = types.ModuleType("ray.util.metrics")
    fake.Counter, fake.Gauge, fake.Histogram = (type(n, (Fake,), {}) for n in ("Counter", "Gauge", "Histogram"))
    monkeypatch.setitem(sys.modules, "ray.util.metrics", fake)
    from neodeploy.serve.ray import RayMetrics

    ray = RayMetrics("r1", lambda: None)
    assert made == {s.name: (s.kind, s.help, ("replica", *s.labels), list(s.buckets) if s.kind == "histogram" else None)
                    for s in SERIES}
    metrics = Metrics()
    metrics.mirrors.append(ray)
    metrics.step(3, 0.02)
    metrics.prefix(10, 4)
    metrics.prefix(6, 0)  # a miss
    metrics.speculated(4, 0)  # a draft with nothing accepted
    assert ray.batch.calls == [("observe", 3, {"replica": "r1"})]
    assert ray.step_seconds.calls == [("observe", 0.02, {"replica": "r1"})]
    assert ray.prefix_queries.calls == [("inc", 10, {"replica": "r1"}), ("inc", 6, {"replica": "r1"})]
    assert ray.prefix_hits.calls == [("inc", 4, {"replica": "r1"})] and ray.accepted.calls == []
    assert ray.drafted.calls == [("inc", 4, {"replica": "r1"})]
