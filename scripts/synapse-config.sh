#!/usr/bin/env bash
# Write a complete Synapse test configuration into DIR.
#
#   scripts/synapse-config.sh DIR PORT REGISTRATION_FILE [SERVER_NAME]
#
# The homeserver listens on 127.0.0.1:PORT only (client and media APIs, no federation),
# keeps its state in DIR (SQLite, media store, log), has every rate limit raised, and
# loads REGISTRATION_FILE as an application service with the experimental appservice
# features the bridge needs (MSC2409 to-device, MSC3202 transaction extensions).
#
# Secrets and the signing key are created once and reused, so running this again on the
# same DIR (for another PORT, say) keeps existing users and their tokens valid. The
# server name must not change for a DIR that already has a database.
#
# Synapse keeps its data in DIR/homeserver.db (SQLite), or, when MIB_SYNAPSE_DATABASE is set
# (postgres://USER@HOST:PORT/DB), in that empty PostgreSQL database, as a production server would.
#
# Prints, one per line: config=…, base_url=…, server_name=…, shared_secret=…
# MIB_SYNAPSE_VENV names the venv; otherwise scripts/ensure-synapse.sh provides one.
set -euo pipefail

usage() { echo "usage: $0 DIR PORT REGISTRATION_FILE [SERVER_NAME]" >&2; exit 2; }
[[ $# -ge 3 && $# -le 4 ]] || usage
if ! [[ $2 =~ ^[0-9]{1,5}$ ]] || ((10#$2 < 1 || 10#$2 > 65535)); then
    echo "PORT must be a number from 1 to 65535" >&2
    exit 2
fi
[[ -f $3 ]] || { echo "registration file not found: $3" >&2; exit 2; }

mkdir -p "$1"
dir=$(cd "$1" && pwd)
port=$2
registration=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")
server_name=${4:-localhost}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${MIB_SYNAPSE_VENV:-$(bash "$here/ensure-synapse.sh")}

# A random secret kept in DIR/NAME.secret, created on first use.
secret() {
    local file=$dir/$1.secret
    if [[ ! -s $file ]]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file")
    fi
    cat "$file"
}
shared_secret=$(secret registration_shared)
macaroon_secret=$(secret macaroon)
form_secret=$(secret form)

# The database section: SQLite in DIR, or the PostgreSQL database of MIB_SYNAPSE_DATABASE.
database_yaml() {
    local uri=${MIB_SYNAPSE_DATABASE:-}
    if [[ -z $uri ]]; then
        printf 'database:\n  name: sqlite3\n  args:\n    database: "%s"\n' "$dir/homeserver.db"
        return
    fi
    [[ $uri =~ ^postgres(ql)?://([^@/]+)@([^:/]+)(:([0-9]+))?/([A-Za-z0-9_]+)$ ]] || {
        echo "MIB_SYNAPSE_DATABASE must look like postgres://USER@HOST:PORT/DB" >&2
        exit 2
    }
    printf 'database:\n  name: psycopg2\n  allow_unsafe_locale: true\n  args:\n'
    printf '    user: "%s"\n    host: "%s"\n    port: %s\n    database: "%s"\n' \
        "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}" "${BASH_REMATCH[5]:-5432}" "${BASH_REMATCH[6]}"
    printf '    cp_min: 5\n    cp_max: 10\n'
}

cat >"$dir/log.config" <<YAML
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $dir/homeserver.log
    encoding: utf8
  console:
    class: logging.StreamHandler
    formatter: precise
    level: WARNING
root:
  level: INFO
  handlers: [file, console]
disable_existing_loggers: false
YAML

# Every rate limit this Synapse knows, raised far above what a test suite sends.
high='{per_second: 10000, burst_count: 10000}'

cat >"$dir/homeserver.yaml" <<YAML
# Written by scripts/synapse-config.sh for tests; regenerated on every run.
server_name: "$server_name"
public_baseurl: "http://127.0.0.1:$port/"
report_stats: false
listeners:
  - port: $port
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client, media]
        compress: false
$(database_yaml)
log_config: "$dir/log.config"
media_store_path: "$dir/media_store"
signing_key_path: "$dir/$server_name.signing.key"
registration_shared_secret: "$shared_secret"
macaroon_secret_key: "$macaroon_secret"
form_secret: "$form_secret"

# No federation: no key servers, no remote servers, no federation listener.
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
allow_public_rooms_over_federation: false

enable_registration: false
# Cheap password hashing: tests register and log in many users.
bcrypt_rounds: 4
enable_metrics: false
url_preview_enabled: false
max_upload_size: 100M

app_service_config_files:
  - "$registration"
experimental_features:
  msc2409_to_device_messages_enabled: true
  msc3202_transaction_extensions: true
  msc3983_appservice_otk_claims: false
  msc3984_appservice_key_query: false

rc_message: $high
rc_registration: $high
rc_registration_token_validity: $high
rc_login:
  address: $high
  account: $high
  failed_attempts: $high
rc_joins:
  local: $high
  remote: $high
rc_joins_per_room: $high
rc_invites:
  per_room: $high
  per_user: $high
  per_issuer: $high
rc_key_requests: $high
rc_3pid_validation: $high
rc_admin_redaction: $high
rc_media_create: $high
rc_room_creation: $high
rc_presence:
  per_user: $high
rc_delayed_event_mgmt: $high
rc_reports: $high
YAML

if [[ ! -s $dir/$server_name.signing.key ]]; then
    "$venv/bin/python" -m synapse.app.homeserver --generate-keys \
        --config-path "$dir/homeserver.yaml" >/dev/null
fi

printf 'config=%s\nbase_url=%s\nserver_name=%s\nshared_secret=%s\n' \
    "$dir/homeserver.yaml" "http://127.0.0.1:$port" "$server_name" "$shared_secret"
