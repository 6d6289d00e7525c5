#!/usr/bin/env bash
# Supply-chain checks: cargo-deny against deny.toml (advisories, licences, sources, duplicate
# versions), with the advisory database taken from the repository's copy in
# supply-chain/advisory-db/, so nothing but the Rust package registry (and, to install
# cargo-deny, the Python package index) is contacted.
#
#   scripts/deny.sh [CHECK...]     CHECK: advisories, bans, licenses, sources (default: all)
#
# Exits non-zero when a check fails. scripts/test.sh runs it.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

deny=$(mib_ensure_cargo_deny)
MIB_ADVISORY_DB_PATH=$(mib_prepare_advisory_db)
export MIB_ADVISORY_DB_PATH

# The copy only knows the advisories published up to its snapshot date.
snapshot=$(sed -n 's/^snapshot-date: *//p' supply-chain/advisory-db/README.md | head -n1)
if [[ -n $snapshot ]] && age=$((($(date +%s) - $(date -d "$snapshot" +%s)) / 86400)); then
    echo "advisory copy of $snapshot ($age days old)"
    if ((age > 90)); then
        echo "WARNING: the advisory copy is $age days old; refresh it (scripts/refresh-advisories.sh)" >&2
    fi
fi

# cargo-deny's --offline is what keeps it from fetching the advisory database, and it also runs
# `cargo metadata` offline, so the crates of every target must be in cargo's cache first.
cargo fetch --locked --quiet
exec "$deny" --locked --offline check "$@"
