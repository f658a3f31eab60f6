"""`sbx.commands.run`: the exec request, the NDJSON stream and its callbacks, exit handling."""

import base64
import json
import threading
import unittest

from agentvm import (CommandExitException, CommandResult, Sandbox, TimeoutException,
                     UnavailableException)
from agentvm.transport import DaemonClient

from .fake_daemon import Chunked, FakeDaemon, fault

EXEC = "/sandboxes/sb-1/exec"


def line(**fields) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def out(data: bytes, stream="stdout") -> bytes:
    return line(**{stream: base64.b64encode(data).decode()})


class CommandsTest(unittest.TestCase):
    def setUp(self):
        self.daemon = FakeDaemon().__enter__()
        self.addCleanup(self.daemon.__exit__, None, None, None)
        self.sbx = Sandbox("sb-1", DaemonClient(self.daemon.socket))

    def test_a_string_runs_through_sh_and_options_map_to_the_exec_body(self):
        self.daemon.on("POST", EXEC, Chunked([line(exit_code=0, timed_out=False)]))
        self.sbx.commands.run("echo $X", timeout=2.5, envs={"X": "1"}, cwd="/tmp",
                              user="1000", stdin="input")
        self.assertEqual(self.daemon.requests[-1].json(),
                         {"cmd": ["sh", "-c", "echo $X"], "env": {"X": "1"}, "cwd": "/tmp",
                          "user": "1000", "timeout_ms": 2500, "stdin": "input"})
        self.sbx.commands.run(["ls", "-l", "/"])
        self.assertEqual(self.daemon.requests[-1].json(), {"cmd": ["ls", "-l", "/"]})

    def test_bad_commands_are_refused_before_sending(self):
        for cmd in ([], [1], None):
            with self.assertRaises(TypeError):
                self.sbx.commands.run(cmd)
        with self.assertRaises(ValueError):
            self.sbx.commands.run("true", timeout=0)
        self.assertEqual(self.daemon.requests, [])

    def test_output_is_collected_and_passed_to_the_callbacks(self):
        self.daemon.on("POST", EXEC, Chunked([
            out(b"hello "), out(b"oops\n", "stderr"), out(b"world\n"),
            line(exit_code=0, timed_out=False)]))
        seen_out, seen_err = [], []
        result = self.sbx.commands.run("x", on_stdout=seen_out.append,
                                       on_stderr=seen_err.append)
        self.assertEqual(result, CommandResult(stdout="hello world\n", stderr="oops\n",
                                               exit_code=0))
        self.assertEqual(seen_out, ["hello ", "world\n"])
        self.assertEqual(seen_err, ["oops\n"])

    def test_lines_and_characters_split_across_chunks_are_joined(self):
        # "é" is two bytes in UTF-8: one in each output event; the JSON lines themselves are
        # cut mid-line, and two lines share one chunk.
        stream = out("caf".encode() + b"\xc3") + out(b"\xa9!") + line(exit_code=0, timed_out=False)
        chunks = [stream[:7], stream[7:30], stream[30:31], stream[31:]]
        self.daemon.on("POST", EXEC, Chunked(chunks))
        seen = []
        result = self.sbx.commands.run("x", on_stdout=seen.append)
        self.assertEqual(result.stdout, "café!")
        self.assertEqual("".join(seen), "café!")
        self.assertNotIn("\ufffd", "".join(seen))

    def test_callbacks_run_while_the_command_still_runs(self):
        first_seen = threading.Event()
        # The daemon sends the rest only once the client saw the first chunk; a client that
        # buffered the whole answer would only get "late" after the wait gave up.
        streamed = []
        self.daemon.on("POST", EXEC, Chunked([
            out(b"first\n"),
            lambda: streamed.append(first_seen.wait(timeout=10)),
            out(b"second\n"),
            line(exit_code=0, timed_out=False)]))

        def on_stdout(text):
            if text == "first\n":
                first_seen.set()

        result = self.sbx.commands.run("x", on_stdout=on_stdout)
        self.assertEqual(result.stdout, "first\nsecond\n")
        self.assertEqual(streamed, [True])

    def test_an_answer_that_closes_the_connection_streams_too(self):
        self.daemon.on("POST", EXEC, Chunked([out(b"a"), out(b"b"),
                                              line(exit_code=0, timed_out=False)], close=True))
        self.assertEqual(self.sbx.commands.run("x", timeout=5).stdout, "ab")
        self.assertEqual(self.sbx.commands.run("x").stdout, "ab")

    def test_a_non_zero_exit_raises_with_the_result(self):
        self.daemon.on("POST", EXEC, Chunked([out(b"partial"), out(b"bad thing\n", "stderr"),
                                              line(exit_code=3, timed_out=False)]))
        with self.assertRaises(CommandExitException) as caught:
            self.sbx.commands.run("x")
        e = caught.exception
        self.assertEqual((e.exit_code, e.stdout, e.stderr, e.signal), (3, "partial",
                                                                       "bad thing\n", None))
        self.assertEqual(e.result.exit_code, 3)
        self.assertIn("exit code 3: bad thing", str(e))

    def test_a_signal_raises_with_the_signal(self):
        self.daemon.on("POST", EXEC, Chunked([line(signal=9, timed_out=False)]))
        with self.assertRaises(CommandExitException) as caught:
            self.sbx.commands.run("x")
        self.assertEqual((caught.exception.signal, caught.exception.exit_code), (9, None))
        self.assertIn("signal 9", str(caught.exception))

    def test_a_timed_out_command_raises_timeout_with_its_output(self):
        self.daemon.on("POST", EXEC, Chunked([out(b"started\n"), line(signal=9, timed_out=True)]))
        with self.assertRaises(TimeoutException) as caught:
            self.sbx.commands.run("sleep 100", timeout=1)
        self.assertEqual(caught.exception.result.stdout, "started\n")
        self.assertTrue(caught.exception.result.timed_out)

    def test_a_broken_agent_connection_or_truncated_stream_is_unavailable(self):
        self.daemon.on("POST", EXEC, Chunked([out(b"x"), line(error="agent went away")]))
        with self.assertRaises(UnavailableException) as caught:
            self.sbx.commands.run("x")
        self.assertIn("agent went away", str(caught.exception))
        self.daemon.on("POST", EXEC, Chunked([out(b"x")]))
        with self.assertRaises(UnavailableException) as caught:
            self.sbx.commands.run("x")
        self.assertIn("before the command's exit status", str(caught.exception))

    def test_lines_a_newer_daemon_adds_are_ignored(self):
        self.daemon.on("POST", EXEC, Chunked([line(progress=1), b"\n",
                                              line(exit_code=0, timed_out=False)]))
        self.assertEqual(self.sbx.commands.run("x").exit_code, 0)

    def test_refusals_before_the_stream_are_typed(self):
        self.daemon.on("POST", EXEC, fault(409, "sandbox sb-1 is paused"))
        with self.assertRaises(Exception) as caught:
            self.sbx.commands.run("x")
        self.assertEqual(type(caught.exception).__name__, "ConflictException")
        self.assertEqual(caught.exception.fault_message, "sandbox sb-1 is paused")


if __name__ == "__main__":
    unittest.main()
