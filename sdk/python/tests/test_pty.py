"""`sbx.pty`: the upgrade request, raw bytes both ways, resize, the exit status and errors."""

import unittest

from agentvm import ConflictException, PtyResult, Sandbox
from agentvm.pty import read_response_head
from agentvm.transport import DaemonClient

from .fake_daemon import FakeDaemon, Reply, Upgrade, fault

PTY = "/sandboxes/sb-1/pty"


class PtyTest(unittest.TestCase):
    def setUp(self):
        self.daemon = FakeDaemon().__enter__()
        self.addCleanup(self.daemon.__exit__, None, None, None)
        self.sbx = Sandbox("sb-1", DaemonClient(self.daemon.socket))

    def test_a_session_echoes_resizes_and_reports_its_exit_status(self):
        self.daemon.on("POST", PTY, Upgrade(7))
        self.daemon.on("POST", PTY + "/7/resize", Reply(204))
        self.daemon.on("GET", PTY + "/7", Reply(200, {
            "id": 7, "running": False, "exit_code": 3, "signal": None, "timed_out": False}))
        seen = []
        handle = self.sbx.pty.create(cols=100, rows=30, envs={"A": "1"}, cwd="/tmp",
                                     timeout=5, on_data=seen.append)
        self.assertEqual((handle.id, handle.pid), (7, 7))
        request = self.daemon.requests[0]
        self.assertEqual(request.headers["Upgrade"], "agentvm-pty")
        self.assertEqual(request.headers["Connection"], "Upgrade")
        self.assertEqual(request.json(), {"cmd": ["sh"], "cols": 100, "rows": 30,
                                          "env": {"A": "1"}, "cwd": "/tmp", "timeout_ms": 5000})
        handle.send_stdin("héllo ")
        handle.send_stdin(b"\x03")
        handle.resize(120, 40)
        self.assertEqual(self.daemon.requests[-1].json(), {"cols": 120, "rows": 40})
        # The fake echoes until the write half closes: kill() closes it.
        result = handle.kill()
        self.assertEqual(result, PtyResult(exit_code=3, signal=None,
                                           output="héllo ".encode() + b"\x03"))
        self.assertEqual(b"".join(seen), result.output)

    def test_a_refused_session_raises_the_typed_error(self):
        self.daemon.on("POST", PTY, fault(409, "POST /sandbox/pty: the VM is paused"))
        with self.assertRaises(ConflictException) as caught:
            self.sbx.pty.create(cmd=["bash"])
        self.assertEqual(caught.exception.fault_message, "POST /sandbox/pty: the VM is paused")
        self.assertEqual(self.daemon.requests[-1].json()["cmd"], ["bash"])

    def test_the_response_head_parser_keeps_the_bytes_after_it(self):
        class Chunks:
            def __init__(self, parts):
                self.parts = list(parts)

            def recv(self, _n):
                return self.parts.pop(0) if self.parts else b""

        status, headers, rest = read_response_head(Chunks([
            b"HTTP/1.1 101 Switching Protocols\r\nX-Agentvm-Pty-Id: 12\r",
            b"\nUpgrade: agentvm-pty\r\n\r\n$ "]))
        self.assertEqual((status, headers["x-agentvm-pty-id"], rest), (101, "12", b"$ "))
