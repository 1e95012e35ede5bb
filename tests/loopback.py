"""Loopback HTTP servers for the tests (127.0.0.1, a free port): a folder (plus fixed routes), or one status."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple


@contextlib.contextmanager
def _running(handler) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def serve(directory: Path, routes: Optional[Dict[str, Tuple[str, bytes]]] = None) -> Iterator[Tuple[str, List[str]]]:
    """Serve ``directory`` (and ``routes``: path -> (content type, body)); yields (base URL, requested paths)."""
    requests: List[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            requests.append(self.path)
            if routes and self.path in routes:
                kind, body = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, *args):  # keep the test output quiet
            pass

    with _running(functools.partial(Handler, directory=str(directory))) as url:
        yield url, requests


@contextlib.contextmanager
def answer(status: int, body: bytes = b"not found") -> Iterator[str]:
    """A server answering every GET with ``status`` and ``body``; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with _running(Handler) as url:
        yield url
