#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ and runs each for SECONDS (default 20), one after another.
# Prints one line per target: executions, executions per second, crashes. Exits non-zero if any
# target crashed (naming the artifact to reproduce it with) or failed to build or run.
#
#   scripts/fuzz.sh            # 20 s per target (CI)
#   scripts/fuzz.sh 3600       # an hour per target
#   FUZZ_TARGETS="api_request egress_dns" scripts/fuzz.sh 60
#
# Corpora grow in fuzz/corpus/<target> (not checked in), seeded from fuzz/seeds/<target>.
# Reproduce a crash: cargo +nightly fuzz run <target> <artifact>  (from fuzz/).
set -euo pipefail

seconds="${1:-20}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz.sh: SECONDS must be a positive whole number of seconds, got '$seconds'" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"
# The machines this runs on have 2 cores shared with other work.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is missing (cargo fuzz needs it for -Zsanitizer)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked </dev/null
fi

echo "== building the fuzz targets (cargo +nightly fuzz build)"
build_start=$SECONDS
cargo +nightly fuzz build </dev/null
echo "== built in $((SECONDS - build_start)) s"

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo +nightly fuzz list </dev/null)
fi

logs="$root/fuzz/target/fuzz-logs"
mkdir -p "$logs"
failed=()
summary=()
for target in "${targets[@]}"; do
    corpus="$root/fuzz/corpus/$target"
    mkdir -p "$corpus"
    if [[ -d "$root/fuzz/seeds/$target" ]]; then
        cp -n "$root/fuzz/seeds/$target"/* "$corpus"/ 2>/dev/null || true
    fi
    log="$logs/$target.log"
    echo "== $target: fuzzing for $seconds s (log: $log)"
    status=0
    # -timeout: one input taking 10 s is a hang, reported as a crash. -rss_limit_mb: a leak or
    # an unbounded allocation is reported too.
    cargo +nightly fuzz run "$target" "$corpus" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        </dev/null >"$log" 2>&1 || status=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)"
    # crash-, timeout-, oom- and leak- files are findings; slow-unit- files are only a note.
    artifact="$(sed -n 's/.*Test unit written to \(.*\/\(crash\|timeout\|oom\|leak\)-.*\)$/\1/p' "$log" | tail -n1)"
    crashes=0
    if [[ -n "$artifact" ]]; then
        crashes=1
    fi
    line="$(printf '%-24s execs %10s  exec/s %7s  crashes %d' "$target" "${execs:-?}" "${rate:-?}" "$crashes")"
    echo "   $line"
    summary+=("$line")
    if [[ $status -ne 0 || -n "$artifact" ]]; then
        if [[ -n "$artifact" ]]; then
            failed+=("$target: crash, artifact $artifact")
        else
            failed+=("$target: cargo fuzz run exited with $status (see $log)")
        fi
        tail -n 30 "$log" >&2
    fi
done

echo "== summary ($seconds s per target)"
printf '   %s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "== FAILED:" >&2
    printf '   %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "== no crashes"
