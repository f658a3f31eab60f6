"""`Sandbox`: one sandbox of the agentvm daemon, by stable ID: a microVM (a Linux guest with the
agent: commands, files, pty) or an isolate (a WebAssembly module: `call`)."""

import base64
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .commands import TIMEOUT_MARGIN_S, Commands
from .exceptions import NotFoundException
from .files import Files
from .pty import Pty
from .transport import DaemonClient, segment

DEFAULT_TEMPLATE = "default"
# The daemon's create timeout when the request names none.
DAEMON_CREATE_TIMEOUT_S = 120
TIER_MICROVM = "microvm"
TIER_ISOLATE = "isolate"
# The longest wall-clock limit an isolate call may have (the daemon's maximum), when the call
# names none: how long `call` waits for its answer, beyond the margin.
MAX_CALL_WALL_S = 600.0

Number = Union[int, float]


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
    # "microvm" or "isolate".
    tier: str = TIER_MICROVM
    # An isolate sandbox's module size and limits (module_bytes, cpu_limit_ms, wall_limit_ms,
    # max_memory_mib).
    isolate: Optional[Dict[str, int]] = None
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
                   ended=value.get("ended"), tier=value.get("tier", TIER_MICROVM),
                   isolate=value.get("isolate"), raw=value)


@dataclass
class CallResult:
    """What an isolate call returned: its results (Python numbers), the lines the module logged,
    and how long the call took."""
    results: List[Number]
    logs: List[str]
    duration_us: int

    @classmethod
    def from_json(cls, value: Dict[str, Any]) -> "CallResult":
        return cls(results=[_number(r) for r in value.get("results", [])],
                   logs=list(value.get("logs", [])), duration_us=value.get("duration_us", 0))


def _number(result: Dict[str, Any]) -> Number:
    """A `{"type": ..., "value": ...}` result as a Python number (floats JSON cannot hold arrive
    as strings: NaN, inf, -inf)."""
    value = result["value"]
    if result.get("type") in ("f32", "f64"):
        return float(value)
    return int(value)


def _argument(i: int, value: Any) -> Union[Number, str]:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"argument {i} is {value!r}: each argument is a number (or a string "
                        f"holding one)")
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinities; the isolate parses their text.
        return repr(value)
    return value


def _module_bytes(module: Union[bytes, bytearray, str, "os.PathLike[str]"]) -> bytes:
    if isinstance(module, (bytes, bytearray)):
        return bytes(module)
    with open(module, "rb") as f:
        return f.read()


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
    def create(cls, template: Optional[str] = None, *, tier: str = TIER_MICROVM,
               module: Union[None, bytes, bytearray, str, "os.PathLike[str]"] = None,
               cpu_limit_ms: Optional[int] = None, wall_limit_ms: Optional[int] = None,
               max_memory_mib: Optional[int] = None,
               egress_policy: Optional[Dict[str, Any]] = None, socket: Optional[str] = None,
               timeout: Optional[float] = None, **overrides: Any) -> "Sandbox":
        """Creates a sandbox and returns once it runs.

        Tier `microvm` (the default): boots `template` (default: `default`) and returns once
        its guest agent answers; `overrides` are fields of POST /sandboxes: id,
        kernel_image_path, initrd_path, boot_args, vcpu_count, mem_size_mib, agent.

        Tier `isolate`: `module` (a WebAssembly binary, as bytes or a file path) is checked by
        the daemon's worker, whose isolates then run `call()`s; `cpu_limit_ms`,
        `wall_limit_ms` (each call's default and maximum) and `max_memory_mib` (the module's
        linear memory) are its limits; `egress_policy` (a dict in the egress policy format,
        credential headers `from_env` only) is what its `agentvm.fetch` may reach (without
        one, nothing); `overrides` may give its id. A module the isolate refuses, or a policy
        the daemon refuses, raises InvalidArgumentException saying why.

        `timeout` (seconds) bounds the create, boot included (the daemon's default: 120). The
        daemon refuses the fields of the other tier (InvalidArgumentException)."""
        body: Dict[str, Any] = {}
        limits = {name: value for name, value in (("cpu_limit_ms", cpu_limit_ms),
                                                  ("wall_limit_ms", wall_limit_ms),
                                                  ("max_memory_mib", max_memory_mib))
                  if value is not None}
        if tier == TIER_MICROVM:
            body["template"] = template if template is not None else DEFAULT_TEMPLATE
        else:
            body["tier"] = tier
            if template is not None:
                body["template"] = template
        if module is not None:
            body["module_base64"] = base64.b64encode(_module_bytes(module)).decode("ascii")
        if limits:
            body["limits"] = limits
        if egress_policy is not None:
            body["egress_policy"] = egress_policy
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

    def call(self, function: str, *args: Union[Number, str],
             cpu_limit_ms: Optional[int] = None,
             wall_limit_ms: Optional[int] = None) -> List[Number]:
        """Calls `function` of an isolate sandbox's module with `args` and returns its results
        as Python numbers: `sbx.call("add", 2, 40) -> [42]`. Failures raise IsolateError
        subclasses by kind (TrapError, LimitExceededError, IsolateCallRefusedError); a microVM
        sandbox raises InvalidArgumentException."""
        return self.invoke(function, *args, cpu_limit_ms=cpu_limit_ms,
                           wall_limit_ms=wall_limit_ms).results

    def invoke(self, function: str, *args: Union[Number, str],
               cpu_limit_ms: Optional[int] = None,
               wall_limit_ms: Optional[int] = None) -> CallResult:
        """As `call`, with the module's log lines and the call's duration."""
        body: Dict[str, Any] = {"function": function,
                                "args": [_argument(i, a) for i, a in enumerate(args)]}
        if cpu_limit_ms is not None:
            body["cpu_limit_ms"] = cpu_limit_ms
        if wall_limit_ms is not None:
            body["wall_limit_ms"] = wall_limit_ms
        wall_s = MAX_CALL_WALL_S if wall_limit_ms is None else wall_limit_ms / 1000
        answer = self._client.call_json("POST", self._sandbox_path("/call"), body,
                                        timeout=wall_s + TIMEOUT_MARGIN_S)
        return CallResult.from_json(answer)

    def metrics(self) -> str:
        """The sandbox VMM's metrics, Prometheus text format."""
        return self._client.call("GET", self._sandbox_path("/metrics")).decode("utf-8")

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, socket={self._client.socket!r})"
