"""`Sandbox`: one sandbox of the agentvm daemon, by stable ID."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .commands import TIMEOUT_MARGIN_S, Commands
from .exceptions import NotFoundException
from .files import Files
from .pty import Pty
from .transport import DaemonClient, segment

DEFAULT_TEMPLATE = "default"
# The daemon's create timeout when the request names none.
DAEMON_CREATE_TIMEOUT_S = 120


@dataclass
class SandboxInfo:
    id: str
    template: str
    # starting, running, paused, stopped, exited, failed or lost.
    state: str
    created_at_ms: int
    vcpu_count: int
    mem_size_mib: int
    agent: bool
    jailed: bool
    api_sock: str
    vsock_uds: str
    pid: Optional[int] = None
    # Why the sandbox is not running any more.
    ended: Optional[str] = None
    # The whole JSON object, fields this SDK does not know included.
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, value: Dict[str, Any]) -> "SandboxInfo":
        return cls(id=value["id"], template=value.get("template", ""), state=value["state"],
                   created_at_ms=value.get("created_at_ms", 0),
                   vcpu_count=value.get("vcpu_count", 0),
                   mem_size_mib=value.get("mem_size_mib", 0), agent=value.get("agent", False),
                   jailed=value.get("jailed", False), api_sock=value.get("api_sock", ""),
                   vsock_uds=value.get("vsock_uds", ""), pid=value.get("pid"),
                   ended=value.get("ended"), raw=value)


class Sandbox:
    """A sandbox: `Sandbox.create()` boots one, `Sandbox.connect(id)` attaches to one.

    Used as a context manager, the sandbox is killed (destroyed) when the block ends."""

    def __init__(self, sandbox_id: str, client: DaemonClient):
        self.id = sandbox_id
        self._client = client
        self.commands = Commands(client, sandbox_id)
        self.files = Files(client, sandbox_id)
        self.pty = Pty(client, sandbox_id)

    @property
    def sandbox_id(self) -> str:
        """E2B's name for `id`."""
        return self.id

    @classmethod
    def create(cls, template: str = DEFAULT_TEMPLATE, *, socket: Optional[str] = None,
               timeout: Optional[float] = None, **overrides: Any) -> "Sandbox":
        """Creates a sandbox from `template` and returns once its guest agent answers.

        `timeout` (seconds) bounds the create, boot included (the daemon's default: 120).
        `overrides` are fields of POST /sandboxes: id, kernel_image_path, initrd_path,
        boot_args, vcpu_count, mem_size_mib, agent."""
        body: Dict[str, Any] = {"template": template}
        body.update(overrides)
        if timeout is not None:
            body["timeout_s"] = max(1, int(round(timeout)))
        # The daemon's create timeout, and a margin for its answer.
        wait = body.get("timeout_s", DAEMON_CREATE_TIMEOUT_S) + TIMEOUT_MARGIN_S
        client = DaemonClient(socket)
        info = client.call_json("POST", "/sandboxes", body, timeout=wait)
        return cls(info["id"], client)

    @classmethod
    def connect(cls, sandbox_id: str, *, socket: Optional[str] = None) -> "Sandbox":
        """The existing sandbox `sandbox_id` (NotFoundException if there is none)."""
        client = DaemonClient(socket)
        client.call_json("GET", f"/sandboxes/{segment(sandbox_id)}")
        return cls(sandbox_id, client)

    @staticmethod
    def list(*, socket: Optional[str] = None) -> List[SandboxInfo]:
        """Every sandbox the daemon knows, oldest first."""
        answer = DaemonClient(socket).call_json("GET", "/sandboxes")
        return [SandboxInfo.from_json(s) for s in answer["sandboxes"]]

    def _sandbox_path(self, suffix: str = "") -> str:
        return f"/sandboxes/{segment(self.id)}{suffix}"

    def info(self) -> SandboxInfo:
        return SandboxInfo.from_json(self._client.call_json("GET", self._sandbox_path()))

    def is_running(self) -> bool:
        return self.info().state == "running"

    def kill(self) -> bool:
        """Destroys the sandbox (its VM and its record). False if it was already gone."""
        try:
            self._client.call("DELETE", self._sandbox_path(), timeout=60)
        except NotFoundException:
            return False
        return True

    def stop(self) -> SandboxInfo:
        """Stops the VM and keeps the record (state `stopped`)."""
        return SandboxInfo.from_json(
            self._client.call_json("POST", self._sandbox_path("/stop"), timeout=60))

    def pause(self) -> SandboxInfo:
        return SandboxInfo.from_json(self._client.call_json("POST", self._sandbox_path("/pause")))

    def resume(self) -> SandboxInfo:
        """Resumes a paused sandbox, or restores a hibernated one."""
        return SandboxInfo.from_json(
            self._client.call_json("POST", self._sandbox_path("/resume"), timeout=180))

    def hibernate(self) -> SandboxInfo:
        """Snapshots the sandbox to the daemon's disk and ends its VM (state `hibernated`); the
        next command, file call or `resume()` restores it."""
        return SandboxInfo.from_json(
            self._client.call_json("POST", self._sandbox_path("/hibernate"), timeout=180))

    def metrics(self) -> str:
        """The sandbox VMM's metrics, Prometheus text format."""
        return self._client.call("GET", self._sandbox_path("/metrics")).decode("utf-8")

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, socket={self._client.socket!r})"
