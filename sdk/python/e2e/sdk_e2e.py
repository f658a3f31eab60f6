"""The SDK end to end against a real `agentvm daemon` and a real Linux guest: run inside the
nested test host by tests/tests/sdk_e2e.rs. Prints one `SDK <check> ok|fail <detail>` line per
check and `SDK-DONE` at the end; exits non-zero if any check failed.

    python3 sdk_e2e.py --socket S --kernel K --initrd I --boot-args "..." """

import argparse
import sys
import threading
import time

from agentvm import (CommandExitException, ConflictException, InvalidArgumentException,
                     NotFoundException, Sandbox, TimeoutException)
from agentvm.transport import DaemonClient

SANDBOX_ID = "sdk-e2e"
# A bound on each wait for the guest (not a speed check: the nested guest runs under TCG).
WAIT_S = 60
TEMPLATE = "l2"
failures = []


def report(name, ok, detail):
    detail = str(detail).replace("\n", "\\n")
    print(f"SDK {name} {'ok' if ok else 'fail'} {detail}", flush=True)
    if not ok:
        failures.append(name)


def check(name, condition, detail):
    report(name, bool(condition), detail)


def expect_raises(name, exception_type, call, describe=lambda e: ""):
    """Passes when `call()` raises exactly the expected SDK exception class."""
    try:
        value = call()
    except exception_type as e:
        report(name, True, f"{type(e).__name__}: {e} {describe(e)}")
        return e
    except Exception as e:  # noqa: BLE001 - any other error is the failure to report
        report(name, False, f"expected {exception_type.__name__}, got {type(e).__name__}: {e}")
        return None
    report(name, False, f"expected {exception_type.__name__}, got {value!r}")
    return None


def guarded(name, body):
    """Runs a check's body; an unexpected exception fails that check, not the run."""
    try:
        body()
    except Exception as e:  # noqa: BLE001
        report(name, False, f"{type(e).__name__}: {e}")


def commands_checks(sbx):
    def stdout_stderr():
        seen_out, seen_err = [], []
        result = sbx.commands.run("echo out1; echo err1 >&2; echo out2",
                                  on_stdout=seen_out.append, on_stderr=seen_err.append)
        check("stdout_stderr_callbacks",
              result.stdout == "out1\nout2\n" and result.stderr == "err1\n"
              and result.exit_code == 0 and "".join(seen_out) == result.stdout
              and "".join(seen_err) == result.stderr,
              f"result={result!r} callbacks={seen_out!r}/{seen_err!r}")

    def argv_options():
        result = sbx.commands.run(["sh", "-c", 'echo "$FOO"; pwd; id -u; cat'],
                                  envs={"FOO": "bar"}, cwd="/tmp", user="1000", stdin="piped")
        check("argv_env_cwd_user_stdin", result.stdout == "bar\n/tmp\n1000\npiped",
              repr(result.stdout))

    def exit_code():
        e = expect_raises("exit_code", CommandExitException,
                          lambda: sbx.commands.run("echo partial; echo why >&2; exit 7"),
                          lambda e: f"exit_code={e.exit_code} stderr={e.stderr!r}")
        if e is not None and (e.exit_code, e.stdout, e.stderr) != (7, "partial\n", "why\n"):
            report("exit_code_result", False, repr(e.result))
        elif e is not None:
            report("exit_code_result", True, repr(e.result))

    def signal():
        e = expect_raises("signal", CommandExitException,
                          lambda: sbx.commands.run("kill -9 $$"),
                          lambda e: f"signal={e.signal}")
        if e is not None:
            check("signal_number", e.signal == 9 and e.exit_code is None, repr(e.result))

    def timeout():
        e = expect_raises("timeout", TimeoutException,
                          lambda: sbx.commands.run("echo started; sleep 60", timeout=2))
        if e is not None:
            check("timeout_output", e.result is not None and e.result.stdout == "started\n"
                  and e.result.timed_out, repr(e.result))

    for name, body in [("stdout_stderr_callbacks", stdout_stderr),
                       ("argv_env_cwd_user_stdin", argv_options), ("exit_code", exit_code),
                       ("signal", signal), ("timeout", timeout)]:
        guarded(name, body)


def files_checks(sbx):
    def text_roundtrip():
        sbx.files.write("/tmp/sdk.txt", "héllo from the SDK\n")
        text = sbx.files.read("/tmp/sdk.txt")
        seen_by_guest = sbx.commands.run("cat /tmp/sdk.txt").stdout
        check("files_text", text == "héllo from the SDK\n" and seen_by_guest == text,
              repr((text, seen_by_guest)))

    def bytes_roundtrip():
        data = bytes(range(256)) * 1024
        sbx.files.write("/tmp/sdk.bin", data)
        back = sbx.files.read("/tmp/sdk.bin", format="bytes")
        size = sbx.commands.run("wc -c < /tmp/sdk.bin").stdout.strip()
        check("files_bytes", back == data and size == str(len(data)),
              f"{len(back)} bytes back, guest says {size}")

    def listing():
        sbx.commands.run("mkdir -p /tmp/sdkdir/sub && printf 12345 > /tmp/sdkdir/five")
        entries = {e.name: e for e in sbx.files.list("/tmp/sdkdir")}
        ok = (set(entries) == {"sub", "five"} and entries["sub"].type == "dir"
              and entries["five"].type == "file" and entries["five"].size == 5
              and entries["five"].path == "/tmp/sdkdir/five")
        check("files_list", ok, repr(sorted(entries.items())))

    def exists():
        found = (sbx.files.exists("/tmp/sdkdir/five"), sbx.files.exists("/tmp/sdkdir/none"),
                 sbx.files.exists("/no/such/dir"))
        check("files_exists", found == (True, False, False), repr(found))

    def missing():
        expect_raises("files_missing_is_not_found", NotFoundException,
                      lambda: sbx.files.read("/tmp/no-such-file"))

    for name, body in [("files_text", text_roundtrip), ("files_bytes", bytes_roundtrip),
                       ("files_list", listing), ("files_exists", exists),
                       ("files_missing_is_not_found", missing)]:
        guarded(name, body)


def watch_checks(sbx):
    def created_file_is_seen():
        sbx.commands.run("mkdir -p /tmp/sdkwatch")
        seen = threading.Event()
        events = []

        def on_event(event):
            events.append(event)
            if event.type == "created" and event.path == "/tmp/sdkwatch/new.txt":
                seen.set()

        with sbx.files.watch("/tmp/sdkwatch", on_event=on_event) as handle:
            sbx.commands.run("echo hi > /tmp/sdkwatch/new.txt")
            arrived = seen.wait(WAIT_S)
            queued = handle.get_new_events()
        check("watch_created", arrived and any(e.path == "/tmp/sdkwatch/new.txt"
                                              for e in queued),
              f"callback={events!r} queued={queued!r}")

    guarded("watch_created", created_file_is_seen)


class Screen:
    """The terminal's output so far, with a wait for a text to appear in it."""

    def __init__(self):
        self.data = b""
        self.changed = threading.Condition()

    def on_data(self, data):
        with self.changed:
            self.data += data
            self.changed.notify_all()

    def wait_for(self, text):
        deadline = time.monotonic() + WAIT_S
        with self.changed:
            while text.encode() not in self.data:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True


def pty_checks(sbx):
    screen = Screen()
    handle = None

    def echo():
        nonlocal handle
        handle = sbx.pty.create(cols=80, rows=24, on_data=screen.on_data)
        # The shell prints the product, not the typed text: the echo proves a round trip.
        handle.send_stdin("echo pty-$((6*7))\n")
        check("pty_echo", handle.id >= 0 and screen.wait_for("pty-42"), repr(screen.data))

    def resize():
        handle.resize(100, 40)
        handle.send_stdin("stty size\n")
        check("pty_resize", screen.wait_for("40 100"), repr(screen.data))

    def exit_code():
        handle.send_stdin("exit 3\n")
        result = handle.wait(timeout=WAIT_S)
        check("pty_exit_code", result.exit_code == 3 and result.signal is None,
              repr((result.exit_code, result.signal)))

    for name, body in [("pty_echo", echo), ("pty_resize", resize),
                       ("pty_exit_code", exit_code)]:
        if name != "pty_echo" and handle is None:
            report(name, False, "no session")
            continue
        guarded(name, body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--initrd", required=True)
    parser.add_argument("--boot-args", required=True)
    parser.add_argument("--create-timeout", type=int, default=500)
    args = parser.parse_args()

    # Templates are the daemon's API, not the SDK's: register one with the SDK's transport.
    DaemonClient(args.socket).call("PUT", f"/templates/{TEMPLATE}", {
        "kernel_image_path": args.kernel, "initrd_path": args.initrd,
        "boot_args": args.boot_args, "vcpu_count": 1, "mem_size_mib": 256})

    expect_raises("unknown_id_is_not_found", NotFoundException,
                  lambda: Sandbox.connect("no-such-sandbox", socket=args.socket))
    expect_raises("out_of_range_is_invalid", InvalidArgumentException,
                  lambda: Sandbox.create(TEMPLATE, socket=args.socket, vcpu_count=999))
    expect_raises("unknown_template_is_not_found", NotFoundException,
                  lambda: Sandbox.create("no-such-template", socket=args.socket))

    try:
        sbx = Sandbox.create(TEMPLATE, socket=args.socket, timeout=args.create_timeout,
                             id=SANDBOX_ID)
    except Exception as e:  # noqa: BLE001
        report("create", False, f"{type(e).__name__}: {e}")
        print("SDK-DONE", flush=True)
        return 1
    with sbx:
        info = sbx.info()
        check("create", sbx.id == SANDBOX_ID and info.state == "running" and info.jailed,
              repr(info))
        listed = [s.id for s in Sandbox.list(socket=args.socket)]
        check("list", SANDBOX_ID in listed, repr(listed))
        check("connect", Sandbox.connect(SANDBOX_ID, socket=args.socket).id == SANDBOX_ID, "")
        expect_raises("duplicate_id_is_conflict", ConflictException,
                      lambda: Sandbox.create(TEMPLATE, socket=args.socket, id=SANDBOX_ID))
        commands_checks(sbx)
        files_checks(sbx)
        watch_checks(sbx)
        pty_checks(sbx)
    # Leaving the block killed (destroyed) the sandbox.
    expect_raises("killed_by_context_manager", NotFoundException,
                  lambda: Sandbox.connect(SANDBOX_ID, socket=args.socket))
    check("kill_again_is_false", sbx.kill() is False, "")
    print("SDK-DONE", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
