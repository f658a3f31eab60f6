#!/usr/bin/env bash
# Runs every test of the project on a fresh machine of the project's kind: installs the system
# packages the tests need, prepares the guest kernel/initramfs (cached), then lint + all tests.
# CI runs exactly this (via .ci/run) with CI=true, where KVM tests fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v lz4 >/dev/null || need+=(lz4)
# The Python SDK's tests (tests/tests/python_sdk.rs), and the interpreter tests/tests/sdk_e2e.rs
# ships into the nested test host.
[ -x /usr/bin/python3 ] || need+=(python3)
if ((${#need[@]})); then
    echo "test.sh: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${need[@]}" >&2
fi

echo "test.sh: checking formatting and lints" >&2
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings

echo "test.sh: preparing the guest kernel and initramfs" >&2
bash kernels/prepare.sh >/dev/null

echo "test.sh: running the tests" >&2
cargo test --release --workspace
