"""Python SDK for the agentvm sandbox host daemon (`agentvm daemon`), in the shape of E2B's SDK:

    from agentvm import Sandbox
    with Sandbox.create() as sbx:
        print(sbx.commands.run("echo hi").stdout)

    with Sandbox.create(tier="isolate", module="add.wasm") as sbx:
        print(sbx.call("add", 2, 40))  # [42]

Standard library only; talks HTTP/1.1 over the daemon's Unix socket (`socket=`, else
$AGENTVM_SOCKET, else /run/agentvm/daemon.sock)."""

from .commands import CommandExitException, CommandResult, Commands
from .exceptions import (ConflictException, InvalidArgumentException, IsolateCallRefusedError,
                         IsolateError, LimitExceededError, NotFoundException, SandboxException,
                         TimeoutException, TrapError, UnavailableException)
from .files import EntryInfo, Files
from .pty import Pty, PtyHandle, PtyResult
from .sandbox import CallResult, Sandbox, SandboxInfo
from .transport import DEFAULT_SOCKET, SOCKET_ENV
from .watch import FilesystemEvent, WatchHandle

__all__ = [
    "Sandbox", "SandboxInfo", "CallResult", "Commands", "CommandResult", "CommandExitException", "Files",
    "EntryInfo", "FilesystemEvent", "WatchHandle", "Pty", "PtyHandle", "PtyResult",
    "SandboxException", "InvalidArgumentException", "NotFoundException",
    "ConflictException", "TimeoutException", "UnavailableException", "IsolateError",
    "IsolateCallRefusedError", "TrapError", "LimitExceededError", "DEFAULT_SOCKET",
    "SOCKET_ENV",
]
