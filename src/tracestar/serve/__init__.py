"""`tracestar serve`: a local web app that traces what the model says (see `app` and `engine`).

    from tracestar.serve import Engine, create_app, BackgroundServer
    with BackgroundServer(create_app(Engine("index/")), port=0) as server:
        print(server.url)            # http://127.0.0.1:<a free port>
"""

from __future__ import annotations

import socket
import sys
import threading
import time

from tracestar.options import ServeOptions
from tracestar.serve.app import LOOPBACK, create_app
from tracestar.serve.engine import Engine

__all__ = ["BackgroundServer", "Engine", "create_app", "serve"]


def _config(app, host: str, port: int):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                          timeout_graceful_shutdown=5)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on (host, port); port 0 takes a free one (read it back from
    `getsockname`). Binding here, not in uvicorn, lets the caller know the port before serving."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(index_dir, *, host: str = ServeOptions.host, port: int = ServeOptions.port, model_dir=None,
          max_new_tokens: int = ServeOptions.max_new_tokens, top_k: int = ServeOptions.top_k) -> None:
    """Load the index and its model, then answer until interrupted (Ctrl-C). The defaults are
    `tracestar serve`'s (`tracestar.options.ServeOptions`)."""
    import uvicorn

    engine = Engine(index_dir, model_dir=model_dir, max_new_tokens=max_new_tokens, top_k=top_k)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    if host not in LOOPBACK:
        print(f"tracestar: warning: serving on {host}: anyone who can reach it can read the corpus", file=sys.stderr)
    server = uvicorn.Server(_config(create_app(engine, host=host), host, port))
    shown = f"[{host}]" if ":" in host else host
    print(f"tracestar: {len(engine.docs)} documents, model {engine.info()['model']}; "
          f"open http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
    server.run(sockets=[sock])


class BackgroundServer:
    """uvicorn in a daemon thread, for tests and benchmarks; port 0 takes a free port."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.host = host
        self.sock = bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.server = uvicorn.Server(_config(app, host, self.port))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="tracestar-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
