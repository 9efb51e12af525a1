"""`neodeploy serve`'s options: what to serve and how, checked before anything starts. Kept apart from the app
(no FastAPI here), so the CLI reads its defaults without the serve extra."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from neodeploy.core.errors import UsageError
from neodeploy.runtime.engine import EngineConfig


@dataclass(frozen=True)
class ServeOptions:
    """One server's settings, checked when made; `neodeploy serve`'s defaults are read from here."""

    artifact: Path
    model_name: str | None = None  # default: the artifact folder's name
    api_key: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    skip_check: bool = False
    backend: str | None = None
    grace_period: float = 30.0  # seconds in-flight requests get on SIGTERM
    threads: int | None = None  # onnxruntime intra-op threads (default: onnxruntime's, all cores)
    replica: str | None = None  # sent back as X-Neodeploy-Replica (Ray sets it per replica)
    allowed_hosts: tuple[str, ...] | None = None  # Host names served (None: any; `run` defaults loopback to loopback)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (none: CORS off)
    header_timeout: float = 10.0  # seconds a connection gets to send a request's headers
    body_timeout: float = 30.0  # seconds a request gets to send its whole body
    max_connections: int = 1024  # open connections; past it a new one gets a 503 and is closed
    chat_template: str | None = None  # Jinja text served instead of the artifact's (`--chat-template`)
    ui: bool = True  # the playground page at GET / (`--no-ui` turns it off)
    host: str = "127.0.0.1"  # bind address: this machine only
    port: int = 8000

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise UsageError(f"--port must be in 1..65535, got {self.port}")
        for name in ("grace_period", "header_timeout", "body_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    value < 0 or (value == 0 and name != "grace_period"):
                low = ">= 0" if name == "grace_period" else "> 0"
                raise UsageError(f"--{name.replace('_', '-')} must be a number of seconds {low}, got {value!r}")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise UsageError(f"--max-connections must be a positive integer, got {self.max_connections!r}")
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in self.allowed_hosts if h.strip()))

    @property
    def name(self) -> str:
        return self.model_name or Path(self.artifact).resolve().name
