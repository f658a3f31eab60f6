"""`sbx.pty`: a process on a terminal in the guest. `POST /sandboxes/{id}/pty` upgrades the
connection (101) and the socket then carries raw terminal bytes both ways; the exit status is
asked for afterwards at `GET /sandboxes/{id}/pty/{pty_id}`."""

import json
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from .exceptions import (SandboxException, TimeoutException, UnavailableException,
                         error_for)
from .transport import SOCKET_ENV, DaemonClient, segment

# The longest response head the SDK accepts before the 101's CRLFCRLF.
MAX_HEAD = 64 * 1024
# How long opening the session (connect, request, the 101) may take.
OPEN_TIMEOUT_S = 60.0

DataCallback = Callable[[bytes], None]


@dataclass
class PtyResult:
    # None when a signal ended the process.
    exit_code: Optional[int]
    signal: Optional[int]
    # Everything the terminal printed.
    output: bytes
    timed_out: bool = False


def read_response_head(sock: socket.socket) -> Tuple[int, Dict[str, str], bytes]:
    """Reads an HTTP/1.1 response head: (status, lower-cased headers, bytes read past it).

    Written by hand because http.client cannot hand over the socket after a 101 (its
    HTTPResponse buffers past the head and has no upgrade support), and this head is all the
    SDK needs to parse: a status line and header lines up to the blank line."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise SandboxException(f"the response head is over {MAX_HEAD} bytes")
        chunk = sock.recv(4096)
        if not chunk:
            raise UnavailableException("the connection closed before the response head ended")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise SandboxException(f"not an HTTP status line: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, rest


def _read_error_body(sock: socket.socket, headers: Dict[str, str], rest: bytes) -> bytes:
    """The body of a non-101 answer (the daemon's errors carry a Content-Length)."""
    length = int(headers.get("content-length", "0") or 0)
    while len(rest) < length:
        chunk = sock.recv(length - len(rest))
        if not chunk:
            break
        rest += chunk
    return rest[:length]


class PtyHandle:
    """A running terminal session. Output goes to `on_data` (on a background thread that reads
    it) and is kept for `wait()`'s result. `id`/`pid` name the session."""

    def __init__(self, client: DaemonClient, session_path: str, pty_id: int,
                 sock: socket.socket, first: bytes, on_data: Optional[DataCallback]):
        self._client = client
        self._session_path = session_path
        self.id = pty_id
        self._sock = sock
        self._on_data = on_data
        self._output: List[bytes] = []
        self.error: Optional[SandboxException] = None
        self._thread = threading.Thread(target=self._read, args=(first,), name="agentvm-pty",
                                        daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        """E2B's name for the session id."""
        return self.id

    def _deliver(self, data: bytes) -> None:
        self._output.append(data)
        if self._on_data is not None:
            self._on_data(data)

    def _read(self, first: bytes) -> None:
        try:
            if first:
                self._deliver(first)
            while True:
                data = self._sock.recv(65536)
                if not data:
                    return
                self._deliver(data)
        except OSError as e:
            self.error = UnavailableException(f"the terminal connection broke off: {e}")
        except Exception as e:  # noqa: BLE001 - an exception in on_data ends the reading
            self.error = SandboxException(f"on_data raised {type(e).__name__}: {e}")
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def send_stdin(self, data: Union[bytes, str]) -> None:
        """Types `data` (text as UTF-8) into the terminal."""
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            self._sock.sendall(payload)
        except OSError as e:
            raise UnavailableException(f"pty {self.id}: the terminal is gone: {e}") from e

    def resize(self, cols: int, rows: int) -> None:
        """Sets the terminal's size; its foreground program gets SIGWINCH."""
        self._client.call("POST", self._session_path + "/resize", {"cols": cols, "rows": rows})

    def wait(self, timeout: Optional[float] = None) -> PtyResult:
        """Waits for the process to end (the server closes the connection then) and returns its
        exit status and output. `timeout` (seconds) bounds the wait: TimeoutException."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutException(f"pty {self.id}: the process did not end within {timeout} s")
        self._sock.close()
        if self.error is not None:
            raise self.error
        status = self._client.call_json("GET", self._session_path)
        if status.get("running"):
            raise UnavailableException(f"pty {self.id}: the connection closed while it runs")
        return PtyResult(exit_code=status.get("exit_code"), signal=status.get("signal"),
                         output=b"".join(self._output),
                         timed_out=bool(status.get("timed_out")))

    def kill(self, timeout: Optional[float] = 30.0) -> PtyResult:
        """Hangs up the terminal (the process gets SIGHUP) and waits for it to end."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return self.wait(timeout)

    def __enter__(self) -> "PtyHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._thread.is_alive():
            self.kill()
        else:
            self._sock.close()


class Pty:
    """Terminal sessions in one sandbox (`sbx.pty`)."""

    def __init__(self, client: DaemonClient, sandbox_id: str):
        self._client = client
        self._path = f"/sandboxes/{segment(sandbox_id)}/pty"

    def create(self, *, cmd: Optional[List[str]] = None, cols: int = 80, rows: int = 24,
               envs: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
               user: Optional[str] = None, timeout: Optional[float] = None,
               on_data: Optional[DataCallback] = None, term: Optional[str] = None) -> PtyHandle:
        """Starts `cmd` (an argv list; default ["sh"]) on a `cols` x `rows` terminal and returns
        once it runs. `timeout` (seconds) makes the guest kill it then; None: no limit."""
        argv = ["sh"] if cmd is None else list(cmd)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError("cmd must be a non-empty list of strings")
        body: dict = {"cmd": argv, "cols": cols, "rows": rows}
        if term is not None:
            body["term"] = term
        if envs:
            body["env"] = dict(envs)
        if cwd is not None:
            body["cwd"] = cwd
        if user is not None:
            body["user"] = user
        if timeout is not None:
            if timeout <= 0:
                raise ValueError("timeout must be positive (seconds), or None for no limit")
            body["timeout_ms"] = max(1, int(timeout * 1000))
        payload = json.dumps(body).encode("utf-8")
        what = f"POST {self._path}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(OPEN_TIMEOUT_S)
            try:
                sock.connect(self._client.socket)
            except OSError as e:
                raise UnavailableException(
                    f"{what}: the daemon does not answer on {self._client.socket} ({e}); "
                    f"start it or set {SOCKET_ENV}") from e
            head = (f"POST {self._path} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Connection: Upgrade\r\nUpgrade: agentvm-pty\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
            sock.sendall(head.encode("latin-1") + payload)
            status, headers, rest = read_response_head(sock)
            if status != 101:
                raise error_for(status if status >= 400 else 502,
                                _read_error_body(sock, headers, rest))
            pty_id = int(headers.get("x-agentvm-pty-id", ""))
            sock.settimeout(None)
        except socket.timeout as e:
            sock.close()
            raise TimeoutException(f"{what}: no answer within {OPEN_TIMEOUT_S} s") from e
        except ValueError as e:
            sock.close()
            raise SandboxException(f"{what}: the 101 has no valid X-Agentvm-Pty-Id") from e
        except BaseException:
            sock.close()
            raise
        return PtyHandle(self._client, f"{self._path}/{pty_id}", pty_id, sock, rest, on_data)
