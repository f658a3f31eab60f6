"""`sbx.files`: read, write and list files in the sandbox's guest through its agent."""

import posixpath
from dataclasses import dataclass
from typing import List, Optional, Union

from .exceptions import InvalidArgumentException, NotFoundException
from .transport import DaemonClient, segment
from .watch import EventCallback, WatchHandle

# Files move whole through memory here; the daemon refuses uploads over 64 MiB.
FILE_TIMEOUT_S = 120.0


@dataclass
class EntryInfo:
    name: str
    # "file", "dir", "symlink" or "other".
    type: str
    path: str
    size: int
    mode: int
    mtime_ns: int
    symlink_target: Optional[str] = None


def _check_absolute(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidArgumentException(f"path {path!r} must be absolute")
    return path


class Files:
    """The sandbox's filesystem (`sbx.files`). Paths are absolute guest paths."""

    def __init__(self, client: DaemonClient, sandbox_id: str):
        self._client = client
        self._path = f"/sandboxes/{segment(sandbox_id)}/files"
        self._watch_path = f"/sandboxes/{segment(sandbox_id)}/watch"

    def write(self, path: str, data: Union[str, bytes]) -> None:
        """Writes `data` (text as UTF-8) as the whole file; its parent directory must exist."""
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._client.call("PUT", self._path, payload, {"path": _check_absolute(path)},
                          timeout=FILE_TIMEOUT_S)

    def read(self, path: str, format: str = "text") -> Union[str, bytes]:
        """The file's contents: text (UTF-8) with format="text", bytes with format="bytes"."""
        if format not in ("text", "bytes"):
            raise InvalidArgumentException(f"format must be 'text' or 'bytes', not {format!r}")
        data = self._client.call("GET", self._path, None, {"path": _check_absolute(path)},
                                 timeout=FILE_TIMEOUT_S)
        return data.decode("utf-8") if format == "text" else data

    def list(self, path: str) -> List[EntryInfo]:
        """The directory's entries."""
        entries = self._client.call_json("GET", self._path + "/list", None,
                                         {"path": _check_absolute(path)})
        return [EntryInfo(name=e["name"], type=e["type"], path=posixpath.join(path, e["name"]),
                          size=e["size"], mode=e["mode"], mtime_ns=e["mtime_ns"],
                          symlink_target=e.get("symlink_target"))
                for e in entries]

    def exists(self, path: str) -> bool:
        """Whether `path` names anything (a file, directory or symlink)."""
        path = posixpath.normpath(_check_absolute(path))
        if path == "/":
            return True
        parent, name = posixpath.split(path)
        try:
            return any(e.name == name for e in self.list(parent))
        except NotFoundException:
            return False
        except InvalidArgumentException:
            # The parent is not a directory.
            return False

    def watch(self, path: str, *, recursive: bool = False,
              on_event: Optional[EventCallback] = None,
              timeout: Optional[float] = None) -> WatchHandle:
        """Watches the directory `path` (and, with `recursive`, the directories under it) and
        returns once the guest watches it. Events arrive on a background thread: `on_event` is
        called there, and they are queued for the handle's `get_new_events()` and iteration.
        `timeout` (seconds) ends the watch when no event arrives for that long; None: never."""
        query = {"path": _check_absolute(path), "recursive": "true" if recursive else "false"}
        connection, response = self._client.open("GET", self._watch_path, None, query,
                                                  body_timeout=timeout)
        return WatchHandle(connection, response, on_event)
