"""``omnifuse serve``: an OpenAI-compatible server with continuous batching (``engine.py``), media
from data: URIs or a media root (``media.py``), request schemas (``schemas.py``) and the app
(``app.py``)."""

from __future__ import annotations

__all__ = ["Engine", "ServeSettings", "create_app"]


def __getattr__(name: str):  # FastAPI is imported only when a server is built
    if name in ("ServeSettings", "create_app"):
        from omnifuse.serving import app

        return getattr(app, name)
    if name == "Engine":
        from omnifuse.serving.engine import Engine

        return Engine
    raise AttributeError(name)
