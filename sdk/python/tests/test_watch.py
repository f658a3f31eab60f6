"""`sbx.files.watch`: the request, the NDJSON events, the error line and stop()."""

import json
import threading
import unittest

from agentvm import (FilesystemEvent, InvalidArgumentException, NotFoundException, Sandbox,
                     UnavailableException)
from agentvm.transport import DaemonClient

from .fake_daemon import Chunked, FakeDaemon, fault

WATCH = "/sandboxes/sb-1/watch"


def line(value) -> bytes:
    return json.dumps(value).encode() + b"\n"


class WatchTest(unittest.TestCase):
    def setUp(self):
        self.daemon = FakeDaemon().__enter__()
        self.addCleanup(self.daemon.__exit__, None, None, None)
        self.sbx = Sandbox("sb-1", DaemonClient(self.daemon.socket))

    def test_events_arrive_in_order_through_the_callback_and_iteration(self):
        self.daemon.on("GET", WATCH, Chunked([
            line({"type": "created", "path": "/w/a", "is_dir": False}),
            line({"type": "modified", "path": "/w/a"}) + line(
                {"type": "moved", "from": "/w/a", "to": "/w/b", "is_dir": False}),
            line({"type": "deleted", "path": "/w/d", "is_dir": True}),
            line({"type": "overflow"}),
        ]))
        seen = []
        with self.sbx.files.watch("/w", recursive=True, on_event=seen.append) as handle:
            events = list(handle)
        expected = [FilesystemEvent("created", "/w/a"), FilesystemEvent("modified", "/w/a"),
                    FilesystemEvent("moved", "/w/b", False, "/w/a"),
                    FilesystemEvent("deleted", "/w/d", True), FilesystemEvent("overflow", "")]
        self.assertEqual(events, expected)
        self.assertEqual(seen, expected)
        self.assertEqual(events[0].name, "/w/a")
        self.assertEqual(self.daemon.requests[-1].query,
                         {"path": ["/w"], "recursive": ["true"]})

    def test_an_error_line_is_raised_after_the_events_before_it(self):
        self.daemon.on("GET", WATCH, Chunked([
            line({"type": "created", "path": "/w/a", "is_dir": False}),
            line({"error": "the agent connection broke"})]))
        handle = self.sbx.files.watch("/w")
        self.assertEqual(self.daemon.requests[-1].query["recursive"], ["false"])
        events = []
        with self.assertRaises(UnavailableException) as caught:
            for event in handle:
                events.append(event)
        self.assertEqual(events, [FilesystemEvent("created", "/w/a")])
        self.assertIn("the agent connection broke", str(caught.exception))
        with self.assertRaises(UnavailableException):
            handle.get_new_events()
        handle.stop()

    def test_stop_closes_a_stream_that_is_still_open(self):
        first_read = threading.Event()
        server_saw_close = threading.Event()

        def wait_for_stop():
            first_read.wait(10)
            # The server's next writes fail once the client closed.
            server_saw_close.set()

        self.daemon.on("GET", WATCH, Chunked([
            line({"type": "created", "path": "/w/a", "is_dir": False}), wait_for_stop]))
        handle = self.sbx.files.watch("/w", on_event=lambda _e: first_read.set())
        self.assertTrue(first_read.wait(10))
        handle.stop()
        # The reader thread ended although the server has not finished its answer.
        self.assertFalse(handle._thread.is_alive())
        self.assertTrue(server_saw_close.wait(10))
        self.assertIsNone(handle.error)
        self.assertEqual(handle.get_new_events(), [FilesystemEvent("created", "/w/a")])
        self.assertEqual(handle.get_new_events(), [])

    def test_the_timeout_ends_a_quiet_watch_without_an_error(self):
        release = threading.Event()
        self.addCleanup(release.set)
        self.daemon.on("GET", WATCH, Chunked([
            line({"type": "created", "path": "/w/a", "is_dir": False}),
            lambda: release.wait(30)]))
        with self.sbx.files.watch("/w", timeout=0.2) as handle:
            self.assertEqual(list(handle), [FilesystemEvent("created", "/w/a")])
            self.assertIsNone(handle.error)

    def test_a_refused_watch_raises_the_typed_error(self):
        self.daemon.on("GET", WATCH, fault(404, "GET /sandbox/watch: /nope does not exist"))
        with self.assertRaises(NotFoundException) as caught:
            self.sbx.files.watch("/nope")
        self.assertIn("/nope does not exist", caught.exception.fault_message)
        with self.assertRaises(InvalidArgumentException):
            self.sbx.files.watch("relative")
