"""Running the app with uvicorn: in the foreground (the CLI) or in a background thread.

:class:`BackgroundServer` starts a real uvicorn server on ``127.0.0.1`` and a free
port in a daemon thread and stops it on exit; tests and the load benchmark drive it
with real HTTP clients::

    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

__all__ = ["BackgroundServer", "free_port", "run"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _config(app: Any, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    # The app logs its own access lines (structlog JSON); uvicorn's would repeat them.
    return uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None, **kwargs)


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Serve ``app`` until interrupted."""
    uvicorn.Server(_config(app, host, port, **kwargs)).run()


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread; ``url`` once entered."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any):
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(_config(app, self.host, self.port, **kwargs))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
