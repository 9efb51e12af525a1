"""`neodeploy serve` as one process: uvicorn with connection limits and header timeouts, and the SIGTERM drain.

Drain: SIGTERM (or Ctrl-C) stops accepting connections and turns /health to "draining"; in-flight requests get the
grace period; when it is over, every request still in flight is cancelled through the engine, so open streams end
with `finish_reason: "cancelled"` and `[DONE]` and queued requests get a 503 JSON, before uvicorn's own deadline
(DRAIN_MARGIN later) would cut connections mid-chunk.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading

from neodeploy.core.errors import UsageError
from neodeploy.runtime.allocator import retain_freed_memory
from neodeploy.serve.app import LOOPBACK_HOSTS, ServeOptions, ServerState, create_app
from neodeploy.serve.protocol import error_body

DRAIN_MARGIN_S = 5.0  # after the grace period: time for cancelled requests to send their last chunk


def _raw_response(status: str, message: str, kind: str, code: str) -> bytes:
    body = json.dumps(error_body(message, kind, code=code)).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def guarded_protocol(base: type, header_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol with what it lacks: a deadline for each request's headers (a client that trickles
    them, or opens a connection and says nothing, is answered 408 and closed) and a cap on open connections (past
    it a new one is answered 503 and closed). Idle kept-alive connections are closed by uvicorn's keep-alive
    timeout (5 s); body deadlines are the app's (handlers.read_json)."""
    too_many = _raw_response("503 Service Unavailable", f"the server has {max_connections} open connections, its "
                             "limit; retry later", "service_unavailable", "too_many_connections")
    too_slow = _raw_response("408 Request Timeout", f"the request headers did not arrive within {header_timeout:g} s",
                             "invalid_request_error", "request_timeout")

    class Guarded(base):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(too_many)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if self._header_timer is None and (before is None or before.response_complete):
                self._arm()  # a new request starts arriving on a kept-alive connection (idle ones are uvicorn's)
            super().data_received(data)
            if self.cycle is not before:  # its headers are complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(too_slow)
                self.transport.close()

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def _http_base() -> type:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def run(options: ServeOptions, log_level: str = "warning") -> int:
    """Serve on options.host:options.port until SIGTERM / Ctrl-C (drain, exit 0), or until loading fails (exit 2) or
    the golden check fails (exit 1). Bound to loopback without --allowed-hosts, only loopback names are served (DNS
    rebinding)."""
    import dataclasses

    import uvicorn

    host, port = options.host, options.port
    retain_freed_memory()  # each request's cache is made and freed within milliseconds (runtime/allocator.py)

    if options.allowed_hosts is None and _is_loopback(host):
        options = dataclasses.replace(options, allowed_hosts=LOOPBACK_HOSTS)
    state = ServerState(options)
    app = create_app(options, state)
    drain = Drain(state)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            drain.start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after its graceful shutdown (the process would die of SIGTERM):
            # a drain that completed is a clean exit, status 0.
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=options.grace_period + DRAIN_MARGIN_S,
                            http=guarded_protocol(_http_base(), options.header_timeout, options.max_connections))
    server = Server(config)

    def stop():
        server.should_exit = True

    state.on_failure = stop
    listener = _listen(host, port)
    print(f"neodeploy serve: listening on http://{host}:{port} (model {options.name!r}, loading {options.artifact})",
          file=sys.stderr, flush=True)
    server.run(sockets=[listener])
    return state.exit_code


def _listen(host: str, port: int) -> socket.socket:
    """Bound here, before saying so: uvicorn binds inside run(), logs a taken port and exits 3 after our line."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port, or a --host "
                         "this machine has") from exc
    return listener


class Drain:
    """SIGTERM's grace period: a timer that cancels whatever is still in flight when it runs out."""

    def __init__(self, state: ServerState):
        self.state, self.timer = state, None

    def start(self) -> None:
        if self.state.status == "ready":
            self.state.status = "draining"
        if self.timer is None:
            self.timer = threading.Timer(self.state.options.grace_period, self.cut)
            self.timer.daemon = True
            self.timer.start()

    def cut(self) -> None:
        engine = self.state.engine
        if engine is None:
            return
        running, waiting = engine.cancel_all()
        if running or waiting:
            print(f"neodeploy serve: the grace period ({self.state.options.grace_period:g} s) is over: cancelled "
                  f"{running} running and {waiting} queued request(s)", file=sys.stderr, flush=True)

