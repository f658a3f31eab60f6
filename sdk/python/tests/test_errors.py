"""Error answers become typed exceptions carrying the status and the daemon's fault_message."""

import os
import socket
import tempfile
import threading
import unittest

from agentvm import (ConflictException, InvalidArgumentException, NotFoundException, Sandbox,
                     SandboxException, TimeoutException, UnavailableException)
from agentvm.exceptions import error_for
from agentvm.transport import DaemonClient

from .fake_daemon import FakeDaemon, Reply, fault


class ErrorMappingTest(unittest.TestCase):
    def test_each_status_has_its_class(self):
        for status, cls in [(400, InvalidArgumentException), (405, InvalidArgumentException),
                            (413, InvalidArgumentException), (404, NotFoundException),
                            (409, ConflictException), (408, TimeoutException),
                            (504, TimeoutException), (503, UnavailableException),
                            (500, SandboxException)]:
            e = error_for(status, b'{"fault_message": "why"}')
            self.assertIs(type(e), cls, status)
            self.assertEqual((e.status, e.fault_message), (status, "why"))
            self.assertIsInstance(e, SandboxException)

    def test_a_body_that_is_not_the_daemon_json_is_the_message(self):
        self.assertEqual(error_for(502, b"Bad gateway\n").fault_message, "Bad gateway")
        self.assertEqual(error_for(400, b'{"other": 1}').fault_message, '{"other": 1}')
        self.assertEqual(error_for(400, b"").fault_message, "(empty answer)")


class ErrorsOverTheSocketTest(unittest.TestCase):
    def setUp(self):
        self.daemon = FakeDaemon().__enter__()
        self.addCleanup(self.daemon.__exit__, None, None, None)

    def test_daemon_faults_are_raised_typed(self):
        self.daemon.on("POST", "/sandboxes", fault(409, "sandbox x already exists"))
        with self.assertRaises(ConflictException) as caught:
            Sandbox.create(socket=self.daemon.socket, id="x")
        self.assertEqual(caught.exception.fault_message, "sandbox x already exists")
        self.assertEqual(caught.exception.status, 409)
        self.daemon.on("POST", "/sandboxes", fault(400, "unknown field `bogus`"))
        with self.assertRaises(InvalidArgumentException):
            Sandbox.create(socket=self.daemon.socket, bogus=1)
        self.assertEqual(self.daemon.requests[-1].json(), {"template": "default", "bogus": 1})

    def test_unknown_routes_are_not_found(self):
        with self.assertRaises(NotFoundException):
            Sandbox("sb-1", DaemonClient(self.daemon.socket)).info()

    def test_a_missing_socket_is_unavailable_and_names_the_socket(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "none.sock")
            with self.assertRaises(UnavailableException) as caught:
                Sandbox.list(socket=path)
            self.assertIn(path, str(caught.exception))
            self.assertIsNone(caught.exception.status)

    def test_a_daemon_that_never_answers_times_out(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "silent.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            accepted = []
            thread = threading.Thread(target=lambda: accepted.append(listener.accept()))
            thread.start()
            try:
                with self.assertRaises(TimeoutException):
                    DaemonClient(path, request_timeout=0.2).call("GET", "/")
            finally:
                thread.join(timeout=10)
                for conn, _ in accepted:
                    conn.close()
                listener.close()

    def test_a_connection_closed_without_an_answer_is_unavailable(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rude.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)

            def hang_up():
                conn, _ = listener.accept()
                conn.recv(65536)
                conn.close()

            thread = threading.Thread(target=hang_up)
            thread.start()
            try:
                with self.assertRaises(UnavailableException):
                    DaemonClient(path).call("GET", "/")
            finally:
                thread.join(timeout=10)
                listener.close()

    def test_a_success_body_is_returned_whole(self):
        self.daemon.on("GET", "/", Reply(200, {"service": "agentvm-daemon"}))
        self.assertEqual(DaemonClient(self.daemon.socket).call_json("GET", "/"),
                         {"service": "agentvm-daemon"})


if __name__ == "__main__":
    unittest.main()
