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
    assert ray.batch.calls == [("observe", 3, {"replica": "r1"})]
    assert ray.step_seconds.calls == [("observe", 0.02, {"replica": "r1"})]
    assert ray.prefix_queries.calls == [("inc", 10, {"replica": "r1"})]
    assert ray.prefix_hits.calls == [("inc", 4, {"replica": "r1"})]
