"""Python SDK for the agentvm sandbox host daemon (`agentvm daemon`), in the shape of E2B's SDK:

    from agentvm import Sandbox
    with Sandbox.create() as sbx:
        print(sbx.commands.run("echo hi").stdout)

Standard library only; talks HTTP/1.1 over the daemon's Unix socket (`socket=`, else
$AGENTVM_SOCKET, else /run/agentvm/daemon.sock)."""

from .commands import CommandExitException, CommandResult, Commands
from .exceptions import (ConflictException, InvalidArgumentException, NotFoundException,
                         SandboxException, TimeoutException, UnavailableException)
from .files import EntryInfo, Files
from .pty import Pty, PtyHandle, PtyResult
from .sandbox import Sandbox, SandboxInfo
from .transport import DEFAULT_SOCKET, SOCKET_ENV
from .watch import FilesystemEvent, WatchHandle

__all__ = [
    "Sandbox", "SandboxInfo", "Commands", "CommandResult", "CommandExitException", "Files",
    "EntryInfo", "FilesystemEvent", "WatchHandle", "Pty", "PtyHandle", "PtyResult",
    "SandboxException", "InvalidArgumentException", "NotFoundException",
    "ConflictException", "TimeoutException", "UnavailableException", "DEFAULT_SOCKET",
    "SOCKET_ENV",
]
