"""`sbx.commands`: run a process in the sandbox, its output streamed back as the daemon's
newline-delimited JSON (`{"stdout": b64}`, `{"stderr": b64}`, then the exit line)."""

import base64
import codecs
import http.client
import json
import socket
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

from .exceptions import SandboxException, TimeoutException, UnavailableException
from .transport import DaemonClient, segment

# Beyond a command's own timeout, how long the SDK waits for the agent to report it killed.
TIMEOUT_MARGIN_S = 30.0

OutputCallback = Callable[[str], None]


@dataclass
class CommandResult:
    stdout: str
    stderr: str
    # None when a signal ended the process.
    exit_code: Optional[int]
    # The signal that ended the process, if one did.
    signal: Optional[int] = None
    timed_out: bool = False

    @property
    def error(self) -> Optional[str]:
        """E2B's name for the process's stderr when it failed."""
        return self.stderr if self.exit_code != 0 else None


class CommandExitException(SandboxException):
    """The command ended with a non-zero exit code or by a signal; the attributes of its
    `CommandResult` are available on the exception too."""

    def __init__(self, result: CommandResult):
        how = (f"exit code {result.exit_code}" if result.signal is None
               else f"signal {result.signal}")
        tail = result.stderr.strip().splitlines()[-1:] or [""]
        super().__init__(f"the command ended with {how}" + (f": {tail[0]}" if tail[0] else ""))
        self.result = result
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exit_code = result.exit_code
        self.signal = result.signal


class _StreamDecoder:
    """Decodes one output stream chunk by chunk: a UTF-8 character split across chunks is passed
    on whole once its last byte arrives."""

    def __init__(self, callback: Optional[OutputCallback]):
        self.callback = callback
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: List[str] = []

    def feed(self, data: bytes, final: bool = False):
        text = self.decoder.decode(data, final)
        if text:
            self.parts.append(text)
            if self.callback is not None:
                self.callback(text)

    def text(self) -> str:
        return "".join(self.parts)


def exec_body(cmd: Union[str, List[str]], envs: Optional[Dict[str, str]], cwd: Optional[str],
              user: Optional[str], timeout: Optional[float],
              stdin: Optional[str]) -> dict:
    """The JSON of `POST /sandboxes/{id}/exec`. A string command runs through `sh -c`."""
    if isinstance(cmd, str):
        argv = ["sh", "-c", cmd]
    elif isinstance(cmd, (list, tuple)) and cmd and all(isinstance(a, str) for a in cmd):
        argv = list(cmd)
    else:
        raise TypeError("cmd must be a shell command string or a non-empty list of strings")
    body: dict = {"cmd": argv}
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
    if stdin is not None:
        body["stdin"] = stdin
    return body


def read_exec_stream(response: http.client.HTTPResponse, on_stdout: Optional[OutputCallback],
                     on_stderr: Optional[OutputCallback]) -> CommandResult:
    """Reads the exec answer's lines to the end, calling the callbacks as output arrives."""
    out, err = _StreamDecoder(on_stdout), _StreamDecoder(on_stderr)
    end = None
    while end is None:
        line = response.readline()
        if not line:
            raise UnavailableException(
                "the exec stream ended before the command's exit status arrived")
        if not line.strip():
            continue
        try:
            event = json.loads(line.decode("utf-8"))
        except ValueError as e:
            raise SandboxException(f"the exec stream sent a line that is not JSON: {line!r}") from e
        if "stdout" in event:
            out.feed(base64.b64decode(event["stdout"]))
        elif "stderr" in event:
            err.feed(base64.b64decode(event["stderr"]))
        elif "error" in event:
            raise UnavailableException(f"the sandbox's agent connection broke: {event['error']}")
        elif "exit_code" in event or "signal" in event:
            end = event
        # Other keys are from a newer daemon: nothing this SDK needs to act on.
    out.feed(b"", final=True)
    err.feed(b"", final=True)
    return CommandResult(stdout=out.text(), stderr=err.text(), exit_code=end.get("exit_code"),
                         signal=end.get("signal"), timed_out=bool(end.get("timed_out")))


class Commands:
    """Processes in one sandbox (`sbx.commands`)."""

    def __init__(self, client: DaemonClient, sandbox_id: str):
        self._client = client
        self._path = f"/sandboxes/{segment(sandbox_id)}/exec"

    def run(self, cmd: Union[str, List[str]], *, timeout: Optional[float] = None,
            on_stdout: Optional[OutputCallback] = None,
            on_stderr: Optional[OutputCallback] = None,
            envs: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
            user: Optional[str] = None, stdin: Optional[str] = None) -> CommandResult:
        """Runs `cmd` (a string through `sh -c`, or an argv list) and waits for it to end.

        `timeout` (seconds) makes the guest agent kill the process group then, and raise
        TimeoutException; with None the command may run as long as it likes. The callbacks get
        the output as text as it arrives. A non-zero exit raises CommandExitException."""
        body = exec_body(cmd, envs, cwd, user, timeout, stdin)
        # Quiet commands print nothing for a while: only bound the wait when the command is.
        body_timeout = None if timeout is None else timeout + TIMEOUT_MARGIN_S
        connection, response = self._client.open("POST", self._path, body,
                                                 body_timeout=body_timeout)
        try:
            result = read_exec_stream(response, on_stdout, on_stderr)
        except socket.timeout as e:
            raise TimeoutException(
                f"the command's end was not reported within {timeout} s (+{TIMEOUT_MARGIN_S} s)"
            ) from e
        except (OSError, http.client.HTTPException) as e:
            raise UnavailableException(f"the exec stream broke off: {e}") from e
        finally:
            # Closing the stream early (an exception in a callback) kills the process group.
            response.close()
            connection.close()
        if result.timed_out:
            raise TimeoutException(f"the command was killed at its {timeout} s timeout",
                                   result=result)
        if result.exit_code != 0:
            raise CommandExitException(result)
        return result
