"""The SDK end to end against a real `agentvm daemon` and a real Linux guest: run inside the
nested test host by tests/tests/sdk_e2e.rs. Prints one `SDK <check> ok|fail <detail>` line per
check and `SDK-DONE` at the end; exits non-zero if any check failed.

    python3 sdk_e2e.py --socket S --kernel K --initrd I --boot-args "..." """

import argparse
import sys

from agentvm import (CommandExitException, ConflictException, InvalidArgumentException,
                     NotFoundException, Sandbox, TimeoutException)
from agentvm.transport import DaemonClient

SANDBOX_ID = "sdk-e2e"
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
    # Leaving the block killed (destroyed) the sandbox.
    expect_raises("killed_by_context_manager", NotFoundException,
                  lambda: Sandbox.connect(SANDBOX_ID, socket=args.socket))
    check("kill_again_is_false", sbx.kill() is False, "")
    print("SDK-DONE", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
