#!/usr/bin/env bash
# Run Synapse in the foreground with DIR/homeserver.yaml (written by synapse-config.sh).
#
#   scripts/start-synapse.sh DIR
#
# The script execs Synapse, so the caller's child process *is* Synapse: killing it
# (SIGTERM) stops the homeserver. Warnings go to stderr; the full log is DIR/homeserver.log.
# MIB_SYNAPSE_VENV names the venv; otherwise scripts/ensure-synapse.sh provides one.
# MIB_SYNAPSE_CPUS (a taskset list, e.g. 0) runs Synapse on those CPUs only: with the
# benchmark pinned to the others, Synapse has cores of its own.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$(cd "$1" && pwd)
[[ -f $dir/homeserver.yaml ]] || { echo "no homeserver.yaml in $dir" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${MIB_SYNAPSE_VENV:-$(bash "$here/ensure-synapse.sh")}

cd "$dir"
export PYTHONUNBUFFERED=1
pin=()
[[ -n ${MIB_SYNAPSE_CPUS:-} ]] && pin=(taskset -c "$MIB_SYNAPSE_CPUS")
exec "${pin[@]}" "$venv/bin/python" -m synapse.app.homeserver --config-path "$dir/homeserver.yaml"
