"""`neodeploy serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (the `serve` extra:
FastAPI, uvicorn, prometheus-client, jinja2). `create_app(ServeOptions(...))` is the one ASGI app.

Imported on first use: `neodeploy.serve.options` (what the CLI reads its defaults from) needs no FastAPI."""

__all__ = ["ServeOptions", "create_app", "run"]
_HOMES = {"ServeOptions": "options", "create_app": "app", "run": "server"}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"neodeploy.serve.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'neodeploy.serve' has no attribute {name!r}")
