"""`sbx.files`: write/read/list/exists requests and answers."""

import unittest

from agentvm import EntryInfo, InvalidArgumentException, Sandbox
from agentvm.transport import DaemonClient

from .fake_daemon import FakeDaemon, Reply, fault

FILES = "/sandboxes/sb-1/files"


def entry(name, kind="file", size=0):
    return {"name": name, "type": kind, "size": size, "mode": 0o644, "mtime_ns": 5}


class FilesTest(unittest.TestCase):
    def setUp(self):
        self.daemon = FakeDaemon().__enter__()
        self.addCleanup(self.daemon.__exit__, None, None, None)
        self.sbx = Sandbox("sb-1", DaemonClient(self.daemon.socket))

    def test_write_puts_the_raw_bytes_with_the_path_in_the_query(self):
        self.daemon.on("PUT", FILES, Reply(204))
        self.sbx.files.write("/tmp/a b&c.txt", "héllo")
        request = self.daemon.requests[-1]
        self.assertEqual(request.query, {"path": ["/tmp/a b&c.txt"]})
        self.assertEqual(request.body, "héllo".encode())
        self.assertEqual(request.headers["Content-Type"], "application/octet-stream")
        self.sbx.files.write("/bin.dat", b"\x00\xff")
        self.assertEqual(self.daemon.requests[-1].body, b"\x00\xff")

    def test_an_upload_refused_before_it_was_read_reports_the_refusal(self):
        self.daemon.max_body = 1024
        with self.assertRaises(InvalidArgumentException) as caught:
            self.sbx.files.write("/big", b"x" * (8 << 20))
        self.assertEqual(caught.exception.status, 413)
        self.assertIn("over 1024 bytes", caught.exception.fault_message)

    def test_read_gives_text_or_bytes(self):
        self.daemon.on("GET", FILES, Reply(200, "ünïcode\n".encode(), "application/octet-stream"))
        self.assertEqual(self.sbx.files.read("/f"), "ünïcode\n")
        self.assertEqual(self.sbx.files.read("/f", format="bytes"), "ünïcode\n".encode())
        self.assertEqual(self.daemon.requests[-1].query, {"path": ["/f"]})
        with self.assertRaises(InvalidArgumentException):
            self.sbx.files.read("/f", format="stream")

    def test_relative_paths_are_refused_before_sending(self):
        for call in (lambda: self.sbx.files.read("f"), lambda: self.sbx.files.write("f", "x"),
                     lambda: self.sbx.files.list("tmp"), lambda: self.sbx.files.exists("x")):
            with self.assertRaises(InvalidArgumentException):
                call()
        self.assertEqual(self.daemon.requests, [])

    def test_list_gives_entries_with_their_full_path(self):
        link = dict(entry("l", "symlink"), symlink_target="/etc")
        self.daemon.on("GET", FILES + "/list", Reply(200, [entry("a", size=3), entry("d", "dir"),
                                                           link]))
        entries = self.sbx.files.list("/tmp")
        self.assertEqual(entries[0], EntryInfo(name="a", type="file", path="/tmp/a", size=3,
                                               mode=0o644, mtime_ns=5))
        self.assertEqual([(e.path, e.type) for e in entries],
                         [("/tmp/a", "file"), ("/tmp/d", "dir"), ("/tmp/l", "symlink")])
        self.assertEqual(entries[2].symlink_target, "/etc")
        self.assertEqual(self.daemon.requests[-1].query, {"path": ["/tmp"]})

    def test_exists_lists_the_parent(self):
        def listing(request):
            parent = request.query["path"][0]
            if parent == "/tmp":
                return Reply(200, [entry("there")])
            if parent == "/tmp/there":
                return fault(400, "/tmp/there is not a directory")
            return fault(404, f"{parent}: no such file or directory")

        self.daemon.on("GET", FILES + "/list", listing)
        self.assertTrue(self.sbx.files.exists("/tmp/there"))
        self.assertTrue(self.sbx.files.exists("/tmp/there/"))
        self.assertFalse(self.sbx.files.exists("/tmp/missing"))
        self.assertFalse(self.sbx.files.exists("/nodir/x"))
        self.assertFalse(self.sbx.files.exists("/tmp/there/below"))
        self.assertTrue(self.sbx.files.exists("/"))


if __name__ == "__main__":
    unittest.main()
