#!/usr/bin/env bash
# Profiles the bridge process during one run of the load bench.
#
#   scripts/profile-run.sh BENCH_BINARY 'max interop → Matrix' SECONDS OUT.data -- BENCH_FLAGS...
#
# Starts the bench binary (built by `cargo bench --bench bridge_load --no-run`, best with
# CARGO_PROFILE_BENCH_DEBUG=line-tables-only for file and line names), waits for the run of that
# name to start (the bench prints "run started: NAME" on standard error), and records the
# bridge's process with `perf record` for SECONDS seconds into OUT.data. The bench's report goes
# to OUT.data.txt. Read the profile with `perf report -i OUT.data`. PERF_FLAGS replaces the
# sampling flags (`-F 999`; `-F 499 --call-graph dwarf` for call stacks, at a cost).
# PROFILE_BENCH=1 records the bench's own process (gateway, contacts, stand-in) instead, and
# PROFILE_GATEWAY=1 the gateway's process (with the bench flag --gateway-process).
set -euo pipefail
[ $# -ge 5 ] && [ "$5" = "--" ] || {
    echo "usage: $0 BENCH_BINARY RUN_NAME SECONDS OUT.data -- BENCH_FLAGS..." >&2
    exit 2
}
bin=$1 run=$2 secs=$3 out=$4
shift 5
command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 1; }

"$bin" --bench "$@" > "$out.txt" 2> >(tee "$out.stderr" >&2) &
bench=$!
pid=""
while kill -0 "$bench" 2>/dev/null; do
    if [ -z "$pid" ]; then
        pid=$(sed -n 's/.*(bridge pid \([0-9]*\)).*/\1/p' "$out.txt" | head -n1)
    fi
    if [ -n "$pid" ] && grep -qF "run started: $run" "$out.stderr" 2>/dev/null; then
        # shellcheck disable=SC2086 # PERF_FLAGS is a list of flags
        [ -n "${PROFILE_BENCH:-}" ] && pid=$bench
        [ -n "${PROFILE_GATEWAY:-}" ] && pid=$(pgrep -P "$bench" -x interop-gateway | head -n1)
        perf record ${PERF_FLAGS:--F 999} -p "$pid" -o "$out" -- sleep "$secs"
        break
    fi
    sleep 0.05
done
wait "$bench"
