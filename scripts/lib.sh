# Shared helpers of scripts/test.sh and scripts/demo.sh. Source it; it defines functions only.
#
#   mib_log MESSAGE...        progress line (callers may redefine it after sourcing)
#   mib_ensure_protoc         install protoc via apt when it is missing and we are root
#   mib_ensure_peer_modules   `npm ci` in tests/peers when node_modules does not match the lock file
#
# shellcheck shell=bash

mib_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

mib_log() { printf '\n== %s\n' "$*"; }

# prost-build (used by the Signal crates) needs protoc at build time. Without root we cannot
# install it; cargo then fails with a message that names protoc.
mib_ensure_protoc() {
    if command -v protoc >/dev/null || [[ -n ${PROTOC:-} ]] || ((EUID != 0)); then
        return 0
    fi
    command -v apt-get >/dev/null || return 0
    mib_log "installing protoc (Debian package protobuf-compiler)"
    apt-get install -y -qq protobuf-compiler >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq protobuf-compiler >/dev/null; }
}

# node_modules counts as current when its stamp holds the lock file's hash, or, without a stamp,
# when npm's own record of the installed tree (node_modules/.package-lock.json) lists the same
# packages, versions and integrity hashes as package-lock.json. Otherwise: npm ci.
mib_ensure_peer_modules() {
    local peers=$mib_repo/tests/peers lock_hash stamp
    [[ -f $peers/package-lock.json ]] || return 0
    lock_hash=$(sha256sum "$peers/package-lock.json" | cut -d' ' -f1)
    stamp=$peers/node_modules/.mib-lock-hash
    if [[ $(cat "$stamp" 2>/dev/null) == "$lock_hash" ]]; then
        return 0
    fi
    if [[ -f $peers/node_modules/.package-lock.json ]] && command -v node >/dev/null \
        && node - "$peers" 2>/dev/null <<'JS'
const fs = require('fs');
const dir = process.argv[2];
const read = (f) => JSON.parse(fs.readFileSync(`${dir}/${f}`, 'utf8')).packages || {};
const want = read('package-lock.json');
const have = read('node_modules/.package-lock.json');
const key = (p) => Object.keys(p).filter((k) => k !== '').sort()
  .map((k) => `${k} ${p[k].version} ${p[k].integrity}`).join('\n');
process.exit(key(want) === key(have) ? 0 : 1);
JS
    then
        echo "$lock_hash" >"$stamp"
        return 0
    fi
    mib_log "npm ci (tests/peers)"
    (cd "$peers" && npm ci --no-audit --no-fund)
    echo "$lock_hash" >"$stamp"
}
