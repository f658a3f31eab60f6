"""A stand-in for `agentvm daemon` in unit tests: a threaded HTTP/1.1 server on a Unix socket
that records each request and answers with what the test queued for its method and path."""

import http.server
import json
import os
import socketserver
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class Reply:
    """A whole answer: status, body (JSON-encoded unless bytes)."""

    def __init__(self, status: int, body=None, content_type: str = "application/json"):
        self.status = status
        if body is None:
            self.body = b""
        elif isinstance(body, bytes):
            self.body = body
        else:
            self.body = json.dumps(body).encode("utf-8")
        self.content_type = content_type


def fault(status: int, message: str) -> Reply:
    return Reply(status, {"fault_message": message})


class Chunked:
    """A 200 answer in chunked transfer encoding: `chunks` are sent one HTTP chunk each, in
    order; a callable in the list is called between chunks (to wait for the client)."""

    def __init__(self, chunks: List, content_type: str = "application/x-ndjson",
                 close: bool = False):
        self.chunks = chunks
        self.content_type = content_type
        # Answer with `Connection: close`, so http.client hands the socket to the response.
        self.close = close


class Upgrade:
    """A 101 answer naming session `pty_id`; then every byte the client sends is echoed back
    until the client closes its write half, and the server closes the connection."""

    def __init__(self, pty_id: int):
        self.pty_id = pty_id


Handler = Callable[[Recorded], object]


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            # The client stopped reading once it had what it needed (e.g. the exit line).
            pass

    def _handle(self):
        daemon: "FakeDaemon" = self.server.daemon  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        if daemon.max_body is not None and length > daemon.max_body:
            # As the real daemon: refused from the Content-Length, the body left unread.
            message = json.dumps({"fault_message": f"the body is over {daemon.max_body} bytes"})
            self.send_response(413)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(message)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(message.encode())
            self.wfile.flush()
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        request = Recorded(self.command, url.path, parse_qs(url.query), dict(self.headers), body)
        daemon.requests.append(request)
        reply = daemon.answer(request)
        if isinstance(reply, Upgrade):
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", request.headers.get("Upgrade", ""))
            self.send_header("X-Agentvm-Pty-Id", str(reply.pty_id))
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.rfile.read1(65536)
                if not data:
                    break
                self.wfile.write(data)
                self.wfile.flush()
            self.close_connection = True
            return
        if isinstance(reply, Chunked):
            self.send_response(200)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Transfer-Encoding", "chunked")
            if reply.close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            for chunk in reply.chunks:
                if callable(chunk):
                    chunk()
                    continue
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        self.send_response(reply.status)
        if reply.body or reply.status != 204:
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if reply.body:
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakeDaemon:
    """Use as a context manager; `socket` is its path, `requests` what it received."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="agentvm-sdk-test-")
        self.socket = os.path.join(self._dir.name, "daemon.sock")
        self.requests: List[Recorded] = []
        self.handlers: Dict[Tuple[str, str], Handler] = {}
        # Bodies over this many bytes are answered 413 without being read.
        self.max_body: Optional[int] = None
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    def on(self, method: str, path: str, handler):
        """Answers `method path` with `handler(request)`, or with `handler` itself if it is a
        Reply or Chunked."""
        self.handlers[(method, path)] = handler if callable(handler) else (lambda _r: handler)

    def answer(self, request: Recorded):
        handler = self.handlers.get((request.method, request.path))
        if handler is None:
            return fault(404, f"no such route: {request.path}")
        return handler(request)

    def __enter__(self) -> "FakeDaemon":
        self._server = _Server(self.socket, _RequestHandler)
        self._server.daemon = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._dir.cleanup()
