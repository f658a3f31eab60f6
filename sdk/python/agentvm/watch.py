"""`sbx.files.watch`: filesystem events from the guest, streamed as the daemon's NDJSON lines.

A background thread reads the stream as it arrives (so `on_event` is called promptly and the
daemon never blocks on a slow reader) and queues the events for `get_new_events()` / iteration.
Closing the connection (`stop()`) cancels the watch in the guest."""

import http.client
import json
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

from .exceptions import SandboxException, UnavailableException


@dataclass
class FilesystemEvent:
    # "created", "deleted", "modified", "moved" or "overflow" (the guest dropped events).
    type: str
    # The path the event is about (for "moved": the new path); "" for "overflow".
    path: str
    is_dir: bool = False
    # For "moved": the old path.
    from_path: Optional[str] = None

    @property
    def name(self) -> str:
        """E2B's name for the event's path."""
        return self.path

    @classmethod
    def from_json(cls, value: dict) -> "FilesystemEvent":
        if value.get("type") == "moved":
            return cls("moved", value.get("to", ""), bool(value.get("is_dir")), value.get("from"))
        return cls(value.get("type", ""), value.get("path", ""), bool(value.get("is_dir")))


EventCallback = Callable[[FilesystemEvent], None]
# Marks the end of the stream in the queue.
_END = object()


class WatchHandle:
    """A running watch. Iterate it (blocks until events arrive; ends when the watch does) or poll
    `get_new_events()`. `error` holds why the stream ended early, if it did; iteration and
    `get_new_events()` raise it. Use as a context manager, or call `stop()`."""

    def __init__(self, connection: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, on_event: Optional[EventCallback]):
        self._connection = connection
        self._response = response
        self._sock: socket.socket = connection.stream_sock  # type: ignore[attr-defined]
        self._on_event = on_event
        self._events: "queue.Queue" = queue.Queue()
        self._stopped = threading.Event()
        self.error: Optional[SandboxException] = None
        self._thread = threading.Thread(target=self._read, name="agentvm-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                line = self._response.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                value = json.loads(line.decode("utf-8"))
                if "error" in value:
                    self.error = UnavailableException(f"the watch failed: {value['error']}")
                    return
                event = FilesystemEvent.from_json(value)
                self._events.put(event)
                if self._on_event is not None:
                    self._on_event(event)
        except socket.timeout:
            # The caller's `timeout` passed without an event: the watch ends, as asked.
            pass
        except (OSError, ValueError, http.client.HTTPException) as e:
            if not self._stopped.is_set():
                self.error = UnavailableException(f"the watch stream broke off: {e}")
        except Exception as e:  # noqa: BLE001 - an exception in on_event ends the watch
            self.error = SandboxException(f"on_event raised {type(e).__name__}: {e}")
        finally:
            self._events.put(_END)
            self._close()

    def _close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._response.close()
        self._connection.close()

    def get_new_events(self) -> List[FilesystemEvent]:
        """The events that arrived since the last call (without waiting)."""
        events = []
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return events
            if item is _END:
                # Kept for the next call and for iteration.
                self._events.put(_END)
                if self.error is not None and not events:
                    raise self.error
                return events
            events.append(item)

    def __iter__(self) -> Iterator[FilesystemEvent]:
        while True:
            item = self._events.get()
            if item is _END:
                self._events.put(_END)
                if self.error is not None:
                    raise self.error
                return
            yield item

    def stop(self) -> None:
        """Closes the stream; the guest cancels the watch."""
        self._stopped.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=10)

    def __enter__(self) -> "WatchHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
