"""Typed errors: one class per kind of failure the daemon reports, mapped from HTTP statuses."""

import json
from typing import Optional


class SandboxException(Exception):
    """Base of every error the SDK raises. `status` is the HTTP status (None when the failure was
    not an HTTP answer) and `fault_message` the daemon's explanation."""

    def __init__(self, fault_message: str, status: Optional[int] = None):
        super().__init__(fault_message if status is None else f"{status}: {fault_message}")
        self.status = status
        self.fault_message = fault_message


class InvalidArgumentException(SandboxException):
    """The request was refused as malformed or out of range (400, 405, 413)."""


class NotFoundException(SandboxException):
    """No such sandbox, template, file or route (404)."""


class ConflictException(SandboxException):
    """Valid, but the sandbox or daemon is not in a state to do it (409)."""


class TimeoutException(SandboxException):
    """Something did not finish in time: the daemon said so (408, 504), the answer did not arrive
    within the SDK's wait, or a command was killed at its timeout (then `result` holds what it
    printed)."""

    def __init__(self, fault_message: str, status: Optional[int] = None, result=None):
        super().__init__(fault_message, status)
        self.result = result


class UnavailableException(SandboxException):
    """The daemon or the sandbox's VMM does not answer (503, or the socket cannot be reached)."""


class IsolateError(SandboxException):
    """A call of an isolate sandbox's function failed; `kind` is the daemon's name for how
    (`trap`, `cpu_limit_exceeded`, `missing_export`, ...: see daemon/api/openapi.yaml)."""

    def __init__(self, fault_message: str, status: Optional[int] = None, kind: str = ""):
        super().__init__(fault_message, status)
        self.kind = kind


class IsolateCallRefusedError(IsolateError, InvalidArgumentException):
    """The call itself was wrong (400): no such export, arguments that do not fit the function's
    parameters; or the module was (`invalid_module`, `instantiate`, `module_too_large`)."""


class TrapError(IsolateError):
    """The function trapped (422); `fault_message` holds the trap's reason."""


class LimitExceededError(IsolateError):
    """The call ran out of a limit (422): `cpu_limit_exceeded`, `wall_limit_exceeded` or
    `out_of_memory`."""


_BY_KIND = {
    "trap": TrapError,
    "cpu_limit_exceeded": LimitExceededError,
    "wall_limit_exceeded": LimitExceededError,
    "out_of_memory": LimitExceededError,
    "missing_export": IsolateCallRefusedError,
    "bad_arguments": IsolateCallRefusedError,
    "invalid_module": IsolateCallRefusedError,
    "instantiate": IsolateCallRefusedError,
    "module_too_large": IsolateCallRefusedError,
}

_BY_STATUS = {
    400: InvalidArgumentException,
    405: InvalidArgumentException,
    413: InvalidArgumentException,
    404: NotFoundException,
    409: ConflictException,
    408: TimeoutException,
    504: TimeoutException,
    503: UnavailableException,
}


def _field_of(body: bytes, name: str) -> Optional[str]:
    try:
        value = json.loads(body.decode("utf-8"))[name]
        if isinstance(value, str):
            return value
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    return None


def fault_message_of(body: bytes) -> str:
    """The `fault_message` of an error body, or the body itself when it is not the daemon's JSON."""
    message = _field_of(body, "fault_message")
    if message is not None:
        return message
    return body.decode("utf-8", errors="replace").strip() or "(empty answer)"


def error_for(status: int, body: bytes) -> SandboxException:
    """The typed error for an answer with HTTP status `status` (>= 400) and body `body`: by the
    error's `kind` when it has one (an isolate call), else by the status."""
    kind = _field_of(body, "kind")
    if kind is not None:
        return _BY_KIND.get(kind, IsolateError)(fault_message_of(body), status, kind)
    return _BY_STATUS.get(status, SandboxException)(fault_message_of(body), status)
