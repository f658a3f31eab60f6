"""Sandbox lifecycle calls: the requests they send and how answers become objects."""

import os
import unittest
from unittest import mock

from agentvm import NotFoundException, Sandbox, SandboxInfo
from agentvm.transport import DEFAULT_SOCKET, SOCKET_ENV, socket_path

from .fake_daemon import FakeDaemon, Reply, fault


def info(sandbox_id="sb-1", state="running"):
    return {"id": sandbox_id, "template": "default", "state": state, "created_at_ms": 1,
            "vcpu_count": 1, "mem_size_mib": 256, "agent": True, "jailed": True, "pid": 42,
            "api_sock": "/s/api.sock", "vsock_uds": "/s/vsock.sock", "future_field": 1}


class SandboxTest(unittest.TestCase):
    def setUp(self):
        self.daemon = FakeDaemon().__enter__()
        self.addCleanup(self.daemon.__exit__, None, None, None)

    def test_create_posts_the_template_overrides_and_timeout(self):
        self.daemon.on("POST", "/sandboxes", Reply(201, info("sb-7")))
        sbx = Sandbox.create("tpl", socket=self.daemon.socket, timeout=30, mem_size_mib=512,
                             id="sb-7")
        self.assertEqual(sbx.id, "sb-7")
        self.assertEqual(sbx.sandbox_id, "sb-7")
        request = self.daemon.requests[-1]
        self.assertEqual(request.headers["Content-Type"], "application/json")
        self.assertEqual(request.json(), {"template": "tpl", "timeout_s": 30,
                                          "mem_size_mib": 512, "id": "sb-7"})

    def test_create_defaults_to_the_default_template_without_a_timeout(self):
        self.daemon.on("POST", "/sandboxes", Reply(201, info()))
        Sandbox.create(socket=self.daemon.socket)
        self.assertEqual(self.daemon.requests[-1].json(), {"template": "default"})

    def test_the_socket_comes_from_the_argument_then_the_environment(self):
        with mock.patch.dict(os.environ, {SOCKET_ENV: "/env.sock"}):
            self.assertEqual(socket_path("/arg.sock"), "/arg.sock")
            self.assertEqual(socket_path(None), "/env.sock")
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertEqual(socket_path(None), DEFAULT_SOCKET)
        self.daemon.on("GET", "/sandboxes", Reply(200, {"sandboxes": []}))
        with mock.patch.dict(os.environ, {SOCKET_ENV: self.daemon.socket}):
            self.assertEqual(Sandbox.list(), [])

    def test_connect_checks_that_the_sandbox_exists(self):
        self.daemon.on("GET", "/sandboxes/sb-1", Reply(200, info()))
        sbx = Sandbox.connect("sb-1", socket=self.daemon.socket)
        self.assertEqual(sbx.id, "sb-1")
        with self.assertRaises(NotFoundException) as caught:
            Sandbox.connect("nope", socket=self.daemon.socket)
        self.assertEqual(caught.exception.status, 404)

    def test_ids_are_sent_as_one_path_segment(self):
        self.daemon.on("GET", "/sandboxes/a%2Fb", fault(400, "bad id"))
        with self.assertRaises(Exception):
            Sandbox.connect("a/b", socket=self.daemon.socket)
        self.assertEqual(self.daemon.requests[-1].path, "/sandboxes/a%2Fb")

    def test_list_and_info_decode_sandbox_info(self):
        self.daemon.on("GET", "/sandboxes",
                       Reply(200, {"sandboxes": [info("a"), info("b", "paused")]}))
        listed = Sandbox.list(socket=self.daemon.socket)
        self.assertEqual([(s.id, s.state) for s in listed], [("a", "running"), ("b", "paused")])
        self.assertIsInstance(listed[0], SandboxInfo)
        self.assertEqual(listed[0].pid, 42)
        self.assertIsNone(listed[0].ended)
        self.assertEqual(listed[0].raw["future_field"], 1)

    def test_stop_pause_resume_hibernate_post_to_their_routes(self):
        for action, state in [("stop", "stopped"), ("pause", "paused"), ("resume", "running"),
                              ("hibernate", "hibernated")]:
            self.daemon.on("POST", f"/sandboxes/sb-1/{action}", Reply(200, info(state=state)))
        sbx = Sandbox("sb-1", _client(self.daemon.socket))
        self.assertEqual(sbx.stop().state, "stopped")
        self.assertEqual(sbx.pause().state, "paused")
        self.assertEqual(sbx.resume().state, "running")
        self.assertEqual(sbx.hibernate().state, "hibernated")
        self.assertEqual([(r.method, r.path) for r in self.daemon.requests],
                         [("POST", "/sandboxes/sb-1/stop"), ("POST", "/sandboxes/sb-1/pause"),
                          ("POST", "/sandboxes/sb-1/resume"), ("POST", "/sandboxes/sb-1/hibernate")])

    def test_kill_deletes_and_says_whether_the_sandbox_was_there(self):
        self.daemon.on("DELETE", "/sandboxes/sb-1", Reply(204))
        sbx = Sandbox("sb-1", _client(self.daemon.socket))
        self.assertTrue(sbx.kill())
        self.daemon.on("DELETE", "/sandboxes/sb-1", fault(404, "no sandbox sb-1"))
        self.assertFalse(sbx.kill())

    def test_the_context_manager_kills_on_exit_even_after_an_error(self):
        self.daemon.on("POST", "/sandboxes", Reply(201, info()))
        self.daemon.on("DELETE", "/sandboxes/sb-1", Reply(204))
        with self.assertRaises(RuntimeError):
            with Sandbox.create(socket=self.daemon.socket):
                raise RuntimeError("inside")
        self.assertEqual(self.daemon.requests[-1].method, "DELETE")
        self.assertEqual(self.daemon.requests[-1].path, "/sandboxes/sb-1")

    def test_metrics_are_the_text(self):
        self.daemon.on("GET", "/sandboxes/sb-1/metrics",
                       Reply(200, b"agentvm_exec_total 3\n", "text/plain"))
        self.assertEqual(Sandbox("sb-1", _client(self.daemon.socket)).metrics(),
                         "agentvm_exec_total 3\n")


def _client(path):
    from agentvm.transport import DaemonClient
    return DaemonClient(path)


if __name__ == "__main__":
    unittest.main()
