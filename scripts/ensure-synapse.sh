#!/usr/bin/env bash
# Create (or reuse) the Python venv that the end-to-end tests use: Synapse as the
# homeserver (with its PostgreSQL driver) and matrix-nio as an independent E2EE Matrix client.
#
#   scripts/ensure-synapse.sh            prints the venv path on stdout
#
# The venv lives in ${MIB_CACHE:-<repo>/.cache}/venv. A stamp file records the pinned
# versions and the Python it was built with; when it matches, this returns at once.
# MIB_PYTHON picks the interpreter (default: python3, which must be 3.10 or newer).
set -euo pipefail

SYNAPSE_PIN="matrix-synapse==1.163.2"
NIO_PIN="matrix-nio[e2e]==0.26.0"
# Synapse's PostgreSQL driver, for a Synapse on PostgreSQL (the bench's MIB_SYNAPSE_DATABASE).
PSYCOPG_PIN="psycopg2-binary==2.9.10"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MIB_CACHE:-$repo/.cache}
venv=$cache/venv
stamp=$venv/.mib-stamp
python=${MIB_PYTHON:-python3}

log() { printf 'ensure-synapse: %s\n' "$*" >&2; }

want_stamp() {
    printf '%s\n%s\n%s\npython %s\n' "$SYNAPSE_PIN" "$NIO_PIN" "$PSYCOPG_PIN" \
        "$("$python" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')"
}

up_to_date() {
    [[ -x $venv/bin/python && -f $stamp ]] && [[ $(<"$stamp") == "$(want_stamp)" ]]
}

if up_to_date; then
    printf '%s\n' "$venv"
    exit 0
fi

mkdir -p "$cache"
# Serialise concurrent installs (two test runs starting at once).
exec 9>"$cache/.venv.lock"
if command -v flock >/dev/null; then flock 9; fi
if up_to_date; then
    printf '%s\n' "$venv"
    exit 0
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { log "$python is older than 3.10; set MIB_PYTHON"; exit 1; }

start=$SECONDS
log "installing $SYNAPSE_PIN and $NIO_PIN into $venv"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    "$SYNAPSE_PIN" "$NIO_PIN" "$PSYCOPG_PIN" >&2
"$venv/bin/python" -c 'import synapse, nio, vodozemac, psycopg2' \
    || { log "installed packages do not import"; exit 1; }
"$venv/bin/python" -m pip freeze --disable-pip-version-check >"$venv/.mib-freeze.txt"
want_stamp >"$stamp"
log "done in $((SECONDS - start)) s"
printf '%s\n' "$venv"
