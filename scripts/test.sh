#!/usr/bin/env bash
# The project's one test command: installs what the tests need, then runs them all.
#
#   scripts/test.sh [extra arguments for cargo nextest / cargo test]
#
# Installs or reuses the Synapse/matrix-nio venv and the Node test peer's packages,
# makes sure PostgreSQL answers, runs the supply-chain checks (scripts/deny.sh), the Rust
# tests, the Node peer's, the matrix-nio client's and the matrix-js-sdk client's self-tests and the
# demo's own check, and exits non-zero if any of them failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if [[ ${CI:-} == true ]]; then export CARGO_TERM_COLOR=never; fi
say() { printf '\n== %s\n' "$*"; }
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

say "Python venv (Synapse, matrix-nio)"
MIB_SYNAPSE_VENV=$(bash scripts/ensure-synapse.sh)
export MIB_SYNAPSE_VENV
echo "$MIB_SYNAPSE_VENV"

# protoc for prost-build (apt, when root), and the Node test peer's packages.
mib_ensure_protoc
mib_ensure_peer_modules
peers=tests/peers

say "PostgreSQL"
export MIB_TEST_PG_URL=${MIB_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
if command -v pg_isready >/dev/null && ! pg_up; then
    version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n1)
    if [[ -n $version ]]; then
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        for _ in $(seq 50); do pg_up && break; sleep 0.2; done
    fi
fi
if command -v pg_isready >/dev/null && ! pg_up; then
    echo "WARNING: PostgreSQL is not reachable at 127.0.0.1:5432; PostgreSQL tests will fail" >&2
fi
echo "MIB_TEST_PG_URL=$MIB_TEST_PG_URL"

status=0
# Advisories (against the repository's copy of the RustSec database), licences, sources and
# duplicate versions, as configured in deny.toml.
say "supply chain: cargo deny check (scripts/deny.sh)"
bash scripts/deny.sh || status=1

# Lints on every crate and target (tests, benches, fuzz targets), warnings as errors.
say "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings || status=1

# The architecture's dependency rules are a test (tests/architecture.rs), run with the others.
if cargo nextest --version >/dev/null 2>&1; then
    say "cargo nextest run"
    cargo nextest run --workspace --no-fail-fast "$@" || status=1
else
    say "cargo test (cargo-nextest not installed)"
    cargo test --workspace --no-fail-fast "$@" || status=1
fi

if [[ -f $peers/selftest.js ]]; then
    say "node $peers/selftest.js"
    node "$peers/selftest.js" || status=1
fi

if [[ -f $peers/e2ee_selftest.py ]]; then
    say "$peers/e2ee_selftest.py (matrix-nio against Synapse)"
    "$MIB_SYNAPSE_VENV/bin/python" "$peers/e2ee_selftest.py" || status=1
fi

if [[ -f $peers/js_e2ee_selftest.js ]]; then
    say "node $peers/js_e2ee_selftest.js (matrix-js-sdk, exclude insecure devices, against Synapse)"
    MIB_SYNAPSE_VENV=$MIB_SYNAPSE_VENV node "$peers/js_e2ee_selftest.js" || status=1
fi

# The benches and the fuzz targets are built (not run), so that they cannot rot; the binaries
# built here are also the demo's.
say "cargo build --workspace --bins --benches (binaries, benches, fuzz targets)"
cargo build --workspace --bins --benches --locked || status=1

# The README's demo, walked through end to end. It listens on fixed loopback ports: a port in
# use (a demo left running, another service) fails the run rather than skipping the check.
say "scripts/demo.sh --check"
MIB_SYNAPSE_VENV=$MIB_SYNAPSE_VENV bash scripts/demo.sh --check --no-build || status=1

if ((status == 0)); then say "all tests passed"; else say "SOME TESTS FAILED"; fi
exit "$status"
