"""The same OpenAI-compatible app on Ray Serve: replicas each load the artifact and run their own engine.

    serve run neodeploy.serve.ray:app artifact=/shared/art replicas=2        # or autoscale=1:4, cpus=2
    neodeploy serve /shared/art --ray --replicas 2 [--address ray://head:10001]

Ray only wraps the app `create_app` builds (one implementation of routes, parameters, streaming and errors). Each
replica verifies the artifact (sha256) and replays golden.npz before it is built; a replica whose load or check
fails raises in its constructor, so it never joins and Serve reports the one-line reason.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from neodeploy.core.errors import UsageError, VerificationError
from neodeploy.runtime.engine import EngineConfig
from neodeploy.runtime.speculate import absolute_draft
from neodeploy.serve.options import ServeOptions
from neodeploy.serve.metrics import SERIES, outcome

DEPLOYMENT = "neodeploy"


@dataclasses.dataclass(frozen=True)
class Scaling:
    replicas: int | None = None  # default 1; not with autoscale
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, on ongoing requests per replica
    cpus: float | None = None  # per replica; default: this machine's cores / replicas (never oversubscribed)
    target_ongoing: int | None = None  # autoscaling target per replica; default the engine's max_running

    def __post_init__(self) -> None:
        if self.replicas is not None and self.autoscale is not None:
            raise UsageError("give --replicas or --autoscale, not both")
        if self.replicas is None:
            object.__setattr__(self, "replicas", 1)
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise UsageError(f"replicas must be a positive integer, got {self.replicas!r}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise UsageError(f"autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        if self.cpus is not None and not self.cpus > 0:
            raise UsageError(f"cpus per replica must be > 0, got {self.cpus}")


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        low, high = (int(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"--autoscale takes MIN:MAX (e.g. 1:4), got {text!r}") from None
    return low, high


class RayMetrics:
    """The engine's metrics through Ray's metrics export (each node's metrics agent, what a cluster's Prometheus
    scrapes), tagged with the replica, so the spread over replicas shows: the series serve/metrics.py declares,
    under the same names prefixed ray_. A mirror of the replica's Metrics, which calls it."""

    def __init__(self, replica: str, engine_ref):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags, self.engine = {"replica": replica}, engine_ref
        for series in SERIES:
            tag_keys = ("replica", *series.labels)
            if series.kind == "histogram":
                metric = Histogram(series.name, series.help, boundaries=list(series.buckets), tag_keys=tag_keys)
            else:
                metric = {"counter": Counter, "gauge": Gauge}[series.kind](series.name, series.help, tag_keys=tag_keys)
            setattr(self, series.attr, metric)

    def _gauges(self) -> None:
        engine = self.engine()
        if engine is not None:
            self.running.set(engine.running, tags=self.tags)
            self.waiting.set(engine.waiting, tags=self.tags)
            self.prefix_bytes.set(engine.prefix.bytes if engine.prefix is not None else 0, tags=self.tags)

    # Ray's Counter.inc refuses 0 (a prefix miss, a draft with nothing accepted): such events add nothing anyway.
    def prefix(self, query_tokens: int, hit_tokens: int) -> None:
        self._count(self.prefix_queries, query_tokens)
        self._count(self.prefix_hits, hit_tokens)

    def speculated(self, drafted: int, accepted: int) -> None:
        self._count(self.drafted, drafted)
        self._count(self.accepted, accepted)

    def _count(self, counter, value: int) -> None:
        if value > 0:
            counter.inc(value, tags=self.tags)

    def step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size, tags=self.tags)
        self.step_seconds.observe(seconds, tags=self.tags)
        self._gauges()

    def token(self, handle, first: bool, seconds: float) -> None:
        (self.ttft if first else self.itl).observe(seconds, tags=self.tags)
        if first:
            self.prompt_tokens.inc(len(handle.prompt_ids), tags=self.tags)

    def finished(self, handle, reason: str) -> None:
        self.requests.inc(1, tags={**self.tags, "outcome": outcome(reason)})
        if handle is not None and handle.sequence.text.output_ids:
            self.generated_tokens.inc(len(handle.sequence.text.output_ids), tags=self.tags)
        self._gauges()


def _replica_builder(options: ServeOptions):
    def build():
        from ray import serve

        from neodeploy.runtime.allocator import retain_freed_memory
        from neodeploy.serve.app import ServerState, create_app

        context = serve.get_replica_context()
        replica = getattr(getattr(context, "replica_id", None), "unique_id", None) or str(os.getpid())
        retain_freed_memory()  # as `neodeploy serve` does (runtime/allocator.py)
        state = ServerState(dataclasses.replace(options, replica=replica))
        state.metrics.mirrors.append(RayMetrics(replica, lambda: state.engine))
        state.load()  # synchronous here: a replica that cannot serve must not join
        if state.status != "ready":
            raise RuntimeError(MARKER + str(state.error))
        return create_app(state.options, state)

    return build


def deployment(options: ServeOptions, scaling: Scaling = Scaling()):
    """A bound Ray Serve application for `serve.run`."""
    from ray import serve

    cpus = scaling.cpus or max(1.0, (os.cpu_count() or 1) / (scaling.autoscale[1] if scaling.autoscale else scaling.replicas))
    threads = max(1, int(cpus))
    # onnxruntime's pool and numpy's BLAS sized to the replica's share, so replicas on one node never oversubscribe.
    # Paths absolute: replicas load the artifact and any draft from their own working folder.
    engine = dataclasses.replace(options.engine, speculate=absolute_draft(options.engine.speculate))
    options = dataclasses.replace(options, threads=options.threads or threads, artifact=Path(options.artifact).resolve(),
                                  engine=engine)
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    settings: dict[str, Any] = dict(name=DEPLOYMENT, ray_actor_options={"num_cpus": cpus, "runtime_env": {"env_vars": env}},
                                    max_ongoing_requests=options.engine.max_running + options.engine.max_waiting,
                                    health_check_period_s=5)
    if scaling.autoscale:
        low, high = scaling.autoscale
        settings["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                          "target_ongoing_requests": scaling.target_ongoing or options.engine.max_running}
    else:
        settings["num_replicas"] = scaling.replicas
    wrapped = serve.deployment(**settings)(serve.ingress(_replica_builder(options))(type("NeodeployReplica", (), {})))
    return wrapped.bind()


def app(args: dict[str, str]):
    """Application builder for `serve run neodeploy.serve.ray:app artifact=PATH [replicas=N] [autoscale=MIN:MAX]
    [cpus=C] [max_running=N] [max_waiting=N] [kv_budget=…] [model_name=…] [skip_check=true]` and Serve config files."""
    args = dict(args)
    if "artifact" not in args:
        raise UsageError("give artifact=PATH (a folder every node can read)")
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    known = {"artifact", "replicas", "autoscale", "cpus", "model_name", "skip_check", "api_key", *engine_fields}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UsageError(f"unknown argument {unknown[0]}; known: {', '.join(sorted(known))}")
    engine = EngineConfig.from_strings({k: v for k, v in args.items() if k in engine_fields})
    options = ServeOptions(Path(args["artifact"]), args.get("model_name"),
                           args.get("api_key") or os.environ.get("NEODEPLOY_API_KEY"), engine,
                           str(args.get("skip_check", "false")).lower() in ("1", "true", "yes"))
    scaling = Scaling(int(args["replicas"]) if "replicas" in args else None, parse_autoscale(args.get("autoscale")),
                      float(args["cpus"]) if "cpus" in args else None)
    return deployment(options, scaling)


MARKER = "neodeploy replica did not start: "


def _replica_error(serve) -> str | None:
    """Our one line from a failed replica, out of Serve's status report (the exception only says 'failed')."""
    try:
        status = serve.status()
        texts = [app.message for app in status.applications.values()]
        texts += [d.message for app in status.applications.values() for d in app.deployments.values()]
    except Exception:  # noqa: BLE001 - best effort: the caller has a fallback
        return None
    for text in texts:
        for line in (text or "").splitlines():
            if MARKER in line:
                return "a replica could not start: " + line.split(MARKER, 1)[1].strip()
    return None


def run(options: ServeOptions, scaling: Scaling, address: str | None = None) -> int:
    """`neodeploy serve --ray`: join a cluster (address) or start a local Ray on 127.0.0.1, deploy, serve until
    SIGTERM / Ctrl-C, then shut down what was started here."""
    import signal
    import sys
    import threading

    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise UsageError(f"--ray needs the ray extra ({exc.name} is missing): pip install 'neodeploy[ray]'") from exc
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    host, port = options.host, options.port
    started_here = address is None
    if started_here:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(deployment(options, scaling), name=DEPLOYMENT, route_prefix="/", blocking=False)
        except Exception as exc:  # noqa: BLE001 - Serve wraps the replica's error in a long report: keep our line
            line = _replica_error(serve) or f"the Ray deployment failed: {str(exc).splitlines()[0]}"
            raise (VerificationError if "golden check failed" in line else UsageError)(line) from None
        print(f"neodeploy serve: {options.name} on Ray Serve at http://{host}:{port} "
              f"({'autoscale ' + ':'.join(map(str, scaling.autoscale)) if scaling.autoscale else f'{scaling.replicas} replicas'})",
              file=sys.stderr, flush=True)
        stop.wait()
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            if started_here:
                ray.shutdown()
