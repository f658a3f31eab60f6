"""Isolate sandboxes: the create body, calls and their results, errors by kind."""

import base64
import math
import os
import tempfile
import unittest

from agentvm import (InvalidArgumentException, IsolateCallRefusedError, IsolateError,
                     LimitExceededError, Sandbox, TrapError)

from .fake_daemon import FakeDaemon, Reply, fault

# The smallest valid module: the magic and version.
MODULE = b"\0asm\x01\0\0\0"


def isolate_info(sandbox_id="iso"):
    return {"id": sandbox_id, "tier": "isolate", "template": "(isolate)", "state": "running",
            "created_at_ms": 1, "vcpu_count": 1, "mem_size_mib": 64, "agent": False,
            "jailed": True, "pid": 7, "api_sock": "/s/api.sock",
            "isolate": {"module_bytes": 8, "cpu_limit_ms": 100, "wall_limit_ms": 1000,
                        "max_memory_mib": 64}}


class IsolateTest(unittest.TestCase):
    def setUp(self):
        self.daemon = FakeDaemon().__enter__()
        self.addCleanup(self.daemon.__exit__, None, None, None)
        self.daemon.on("POST", "/sandboxes", Reply(201, isolate_info()))

    def create(self, **kwargs):
        return Sandbox.create(tier="isolate", socket=self.daemon.socket, **kwargs)

    def test_create_sends_the_module_in_base64_and_the_limits_and_no_template(self):
        sbx = self.create(module=MODULE, cpu_limit_ms=100, max_memory_mib=8, id="iso")
        self.assertEqual(sbx.id, "iso")
        self.assertEqual(self.daemon.requests[-1].json(), {
            "tier": "isolate", "module_base64": base64.b64encode(MODULE).decode(),
            "limits": {"cpu_limit_ms": 100, "max_memory_mib": 8}, "id": "iso"})

    def test_an_egress_policy_goes_in_the_body_as_given(self):
        policy = {"version": 1, "rules": [{"domain": "api.example.com", "ports": [443]}]}
        self.create(module=MODULE, egress_policy=policy)
        self.assertEqual(self.daemon.requests[-1].json()["egress_policy"], policy)

    def test_the_module_may_be_a_file_path(self):
        with tempfile.NamedTemporaryFile(suffix=".wasm", delete=False) as f:
            f.write(MODULE)
        self.addCleanup(os.unlink, f.name)
        self.create(module=f.name)
        body = self.daemon.requests[-1].json()
        self.assertEqual(base64.b64decode(body["module_base64"]), MODULE)
        self.assertNotIn("limits", body)

    def test_a_refused_module_is_an_invalid_argument(self):
        self.daemon.on("POST", "/sandboxes", fault(
            400, "sandbox iso: the module is refused: invalid WebAssembly module: bad magic"))
        with self.assertRaises(InvalidArgumentException) as caught:
            self.create(module=b"nope")
        self.assertIn("the module is refused", caught.exception.fault_message)

    def test_info_shows_the_tier_and_limits(self):
        self.daemon.on("GET", "/sandboxes/iso", Reply(200, isolate_info()))
        info = self.create(module=MODULE).info()
        self.assertEqual(info.tier, "isolate")
        self.assertEqual(info.isolate["cpu_limit_ms"], 100)
        self.assertEqual(info.vsock_uds, "")

    def test_call_sends_the_arguments_and_returns_python_numbers(self):
        self.daemon.on("POST", "/sandboxes/iso/call", Reply(200, {
            "results": [{"type": "i32", "value": 42}, {"type": "i64", "value": -7},
                        {"type": "f64", "value": 2.5}, {"type": "f32", "value": "NaN"},
                        {"type": "f64", "value": "-inf"}],
            "logs": ["hello"], "duration_us": 12}))
        sbx = self.create(module=MODULE)
        results = sbx.call("add", 2, "40", 1.5, cpu_limit_ms=50)
        self.assertEqual(results[:3], [42, -7, 2.5])
        self.assertIsInstance(results[0], int)
        self.assertTrue(math.isnan(results[3]))
        self.assertEqual(results[4], float("-inf"))
        self.assertEqual(self.daemon.requests[-1].json(),
                         {"function": "add", "args": [2, "40", 1.5], "cpu_limit_ms": 50})
        invoked = sbx.invoke("add", float("inf"))
        self.assertEqual(invoked.logs, ["hello"])
        self.assertEqual(invoked.duration_us, 12)
        self.assertEqual(self.daemon.requests[-1].json()["args"], ["inf"])

    def test_arguments_that_are_not_numbers_are_refused_before_sending(self):
        sbx = self.create(module=MODULE)
        sent = len(self.daemon.requests)
        for bad in (True, None, [1]):
            with self.assertRaises(TypeError):
                sbx.call("add", bad)
        self.assertEqual(len(self.daemon.requests), sent)

    def test_call_errors_are_typed_by_kind(self):
        sbx = self.create(module=MODULE)
        cases = [
            (422, "trap", "the function trapped: wasm `unreachable` instruction executed",
             TrapError),
            (422, "cpu_limit_exceeded", "CPU time limit exceeded (100ms)", LimitExceededError),
            (422, "out_of_memory", "the isolate ran out of memory", LimitExceededError),
            (400, "missing_export", "the module exports no function 'nope'",
             IsolateCallRefusedError),
            (500, "crashed", "the isolate guest crashed: guest panic", IsolateError),
        ]
        for status, kind, message, cls in cases:
            self.daemon.on("POST", "/sandboxes/iso/call",
                           Reply(status, {"fault_message": message, "kind": kind}))
            with self.assertRaises(cls) as caught:
                sbx.call("f")
            self.assertEqual(caught.exception.kind, kind)
            self.assertEqual(caught.exception.status, status)
            self.assertEqual(caught.exception.fault_message, message)
        # A refused call is also an invalid argument, as other 400s are.
        self.assertTrue(issubclass(IsolateCallRefusedError, InvalidArgumentException))

    def test_the_other_tiers_routes_raise_the_daemons_400(self):
        message = ("sandbox iso is an isolate sandbox; POST /sandboxes/{id}/exec needs tier "
                   "microvm")
        self.daemon.on("POST", "/sandboxes/iso/exec", fault(400, message))
        sbx = self.create(module=MODULE)
        with self.assertRaises(InvalidArgumentException) as caught:
            sbx.commands.run("echo hi")
        self.assertEqual(caught.exception.fault_message, message)
        self.assertNotIsInstance(caught.exception, IsolateError)
        self.daemon.on("POST", "/sandboxes/vm/call", fault(
            400, "sandbox vm is a microvm sandbox; POST /sandboxes/{id}/call needs tier "
                 "isolate"))
        with self.assertRaises(InvalidArgumentException) as caught:
            Sandbox("vm", sbx._client).call("add", 1, 2)
        self.assertIn("needs tier isolate", caught.exception.fault_message)


if __name__ == "__main__":
    unittest.main()
