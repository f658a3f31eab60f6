"""HTTP/1.1 to the daemon over its Unix socket, with http.client (one connection per request:
connecting to a local socket is cheap, and no connection state outlives a call)."""

import http.client
import json
import os
import socket
from typing import Any, Mapping, Optional, Tuple, Union
from urllib.parse import quote, urlencode

from .exceptions import TimeoutException, UnavailableException, error_for

DEFAULT_SOCKET = "/run/agentvm/daemon.sock"
SOCKET_ENV = "AGENTVM_SOCKET"
# How long an ordinary call may take, from connecting to the end of the answer.
DEFAULT_REQUEST_TIMEOUT = 30.0

Body = Union[None, bytes, Mapping[str, Any]]
# `open`'s default: the answer's body is read with the same timeout as its headers.
SAME_TIMEOUT = object()


def socket_path(socket_arg: Optional[str]) -> str:
    return socket_arg or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def segment(value: str) -> str:
    """`value` as one path segment."""
    return quote(value, safe="")


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose transport is a Unix stream socket (http.client has none built in)."""

    def __init__(self, path: str, timeout: Optional[float]):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    """Requests to one daemon socket. Error answers raise the typed exceptions."""

    def __init__(self, socket_arg: Optional[str] = None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self.socket = socket_path(socket_arg)
        self.request_timeout = request_timeout

    def open(self, method: str, path: str, body: Body = None,
             query: Optional[Mapping[str, str]] = None,
             timeout: Optional[float] = None,
             body_timeout: Any = SAME_TIMEOUT) -> Tuple[http.client.HTTPConnection,
                                                         http.client.HTTPResponse]:
        """Sends a request and returns the connection and its answer, body unread, when the
        status is a success; raises the typed error otherwise. The caller closes the connection.
        `body_timeout` (seconds, or None for no limit) replaces `timeout` for reading the body."""
        what = f"{method} {path}"
        target = path + ("?" + urlencode(query) if query else "")
        headers = {"Host": "localhost"}
        if isinstance(body, (bytes, bytearray)):
            payload = bytes(body)
            headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        else:
            payload = None
        if payload is not None:
            headers["Content-Length"] = str(len(payload))
        wait = self.request_timeout if timeout is None else timeout
        connection = UnixHTTPConnection(self.socket, wait)
        try:
            connection.connect()
        except OSError as e:
            connection.close()
            raise UnavailableException(
                f"{what}: the daemon does not answer on {self.socket} ({e}); start it with "
                f"`agentvm daemon --sock {self.socket}` or set {SOCKET_ENV}") from e
        try:
            try:
                connection.request(method, target, body=payload, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may refuse a body before reading it all (413 from its
                # Content-Length) and close: its answer is still there to read.
                if connection.sock is None:
                    raise
            # Kept here: http.client lets go of the socket when the answer closes the connection.
            sock = connection.sock
            response = connection.getresponse()
            if response.status >= 400:
                raise error_for(response.status, response.read())
            if body_timeout is not SAME_TIMEOUT:
                sock.settimeout(body_timeout)
            # For streams another thread must interrupt: shutting this socket down wakes it.
            connection.stream_sock = sock
            return connection, response
        except socket.timeout as e:
            connection.close()
            raise TimeoutException(f"{what}: no answer from {self.socket} within {wait} s") from e
        except (OSError, http.client.HTTPException) as e:
            connection.close()
            raise UnavailableException(f"{what}: the connection to {self.socket} broke: {e}") from e
        except BaseException:
            connection.close()
            raise

    def call(self, method: str, path: str, body: Body = None,
             query: Optional[Mapping[str, str]] = None,
             timeout: Optional[float] = None) -> bytes:
        """A whole request: the answer's body (raises the typed error for an error status)."""
        connection, response = self.open(method, path, body, query, timeout)
        try:
            return response.read()
        except socket.timeout as e:
            raise TimeoutException(f"{method} {path}: the answer stalled") from e
        except (OSError, http.client.HTTPException) as e:
            raise UnavailableException(f"{method} {path}: the answer broke off: {e}") from e
        finally:
            connection.close()

    def call_json(self, method: str, path: str, body: Body = None,
                  query: Optional[Mapping[str, str]] = None,
                  timeout: Optional[float] = None) -> Any:
        data = self.call(method, path, body, query, timeout)
        return json.loads(data.decode("utf-8")) if data else None
