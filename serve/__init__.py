"""`neodeploy serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (the `serve` extra:
FastAPI, uvicorn, prometheus-client, jinja2). `create_app(ServeOptions(...))` is the one ASGI app."""

from neodeploy.serve.app import ServeOptions, create_app
from neodeploy.serve.server import run

__all__ = ["ServeOptions", "create_app", "run"]
