#!/usr/bin/env bash
# Refresh supply-chain/advisory-db/, the repository's copy of the RustSec advisories that
# concern the crates in Cargo.lock (read by scripts/deny.sh; see its README.md).
#
#   scripts/refresh-advisories.sh         fetch the advisory database with cargo-deny (needs
#                                         access to the code host that serves it), then copy
#   scripts/refresh-advisories.sh DIR     copy from an existing checkout of the database in DIR
#
# For each crate name in Cargo.lock, crates/<name>/*.md is copied (placeholder files named
# RUSTSEC-0000-0000* are left out), crates/ is replaced as a whole, and the snapshot date in the
# README becomes today's. Review the diff, then run scripts/deny.sh.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

dest=supply-chain/advisory-db
if (($# > 0)); then
    src=$1
else
    deny=$(mib_ensure_cargo_deny)
    # No MIB_ADVISORY_DB_PATH: deny.toml's db-path then points at .cache/advisory-dbs-upstream/.
    env -u MIB_ADVISORY_DB_PATH "$deny" fetch db
    src=$(find .cache/advisory-dbs-upstream -mindepth 1 -maxdepth 1 -type d -name 'advisory-db-*' | head -n1)
fi
if [[ ! -d $src/crates ]]; then
    echo "no advisory database at '$src' (expected a crates/ directory in it)" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
count=0
while read -r name; do
    [[ -d $src/crates/$name ]] || continue
    for file in "$src/crates/$name"/*.md; do
        [[ -f $file ]] || continue
        case $(basename "$file") in RUSTSEC-0000-0000*) continue ;; esac
        mkdir -p "$tmp/crates/$name"
        cp "$file" "$tmp/crates/$name/"
        count=$((count + 1))
    done
done < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u)

rm -rf "$dest/crates"
if [[ -d $tmp/crates ]]; then cp -R "$tmp/crates" "$dest/crates"; fi
sed -i "s/^snapshot-date: .*/snapshot-date: $(date -u +%F)/" "$dest/README.md"
echo "copied $count advisories from $src into $dest (snapshot date $(date -u +%F))"
