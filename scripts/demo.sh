#!/usr/bin/env bash
# A working demo on loopback: Synapse, the reference interop gateway, the bridge, a Matrix user and
# an interop contact, all from this checkout, with their state in .demo/ (git-ignored).
#
#   scripts/demo.sh              start everything; keep it running until Ctrl-C
#   scripts/demo.sh --check      start everything, walk through the demo as a check user (ping, login,
#                                start-chat with the demo contact, its answer), stop; exit 0/1
#   scripts/demo.sh --reset      wipe .demo/ first (new keys, accounts and rooms); combines with the others
#   scripts/demo.sh --no-build   use the binaries already built in target/debug instead of `cargo build`
#
# Listens on 127.0.0.1 only: Synapse 8008, bridge appservice API 29340, bridge metrics 8001,
# interop gateway 29400. Every process the script starts runs in its own process group and is
# stopped (group and all) when the script ends, whether by Ctrl-C, an error or the end of --check.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"

HS_PORT=8008
AS_PORT=29340
METRICS_PORT=8001
GW_PORT=29400
SERVER_NAME=localhost
DEV_CODE=123456
DEMO_USER=demo
DEMO_PASSWORD=demo
CONTACT=+15550000100
CONTACT_NAME="Demo Contact"
BOT="@interopbot:$SERVER_NAME"
HS_URL="http://127.0.0.1:$HS_PORT"

demo=$repo/.demo
logs=$demo/logs
bin_dir=${CARGO_TARGET_DIR:-$repo/target}/debug
bridge_bin=$bin_dir/matrix-interop-bridge
gateway_bin=$bin_dir/interop-gateway

check=0 reset=0 build=1
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
for arg in "$@"; do
    case $arg in
        --check) check=1 ;;
        --reset) reset=1 ;;
        --no-build) build=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "demo: unknown argument $arg" >&2; usage >&2; exit 2 ;;
    esac
done

note() { printf 'demo: %s\n' "$*"; }
mib_log() { note "$*"; }
fail() {
    printf 'demo: ERROR: %s\n' "$*" >&2
    exit 1
}
ms_now() { echo $(($(date +%s%N) / 1000000)); }
started_ms=$(ms_now)

# Every process logs to a file: no colour codes, please.
export NO_COLOR=1

# ---------------------------------------------------------------------------------------------
# Processes: each runs in a new session (so its own process group), and is stopped on exit.

names=() pids=() plogs=()

start_bg() { # NAME LOGFILE COMMAND...
    local name=$1 log=$2
    shift 2
    if command -v setsid >/dev/null; then
        setsid "$@" >"$log" 2>&1 </dev/null &
    else
        "$@" >"$log" 2>&1 </dev/null &
    fi
    names+=("$name")
    pids+=("$!")
    plogs+=("$log")
}

alive() { kill -0 "$1" 2>/dev/null; }

signal_group() { # SIGNAL PID: the process group if the process leads one, else the process
    kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true
}

stop_all() {
    local i pid any
    # Reverse start order: contact, bridge, Synapse, gateway.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        signal_group TERM "${pids[i]}"
    done
    for _ in $(seq 100); do
        any=0
        for pid in "${pids[@]}"; do alive "$pid" && any=1; done
        ((any)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do signal_group KILL "$pid"; done
    wait 2>/dev/null || true
}

cleaned=0
cleanup() {
    ((cleaned)) && return
    cleaned=1
    if ((${#pids[@]})); then
        note "stopping ${names[*]}"
        stop_all
        note "stopped"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_log() { # FILE
    [[ -f $1 ]] || return 0
    printf -- '--- last lines of %s\n' "${1#"$repo"/}" >&2
    tail -n 25 "$1" >&2
    printf -- '---\n' >&2
}

# wait_for WHAT SECONDS INDEX COMMAND...: until COMMAND succeeds, while process INDEX runs.
wait_for() {
    local what=$1 seconds=$2 index=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ! alive "${pids[index]}"; then
            local rc=0
            wait "${pids[index]}" || rc=$?
            show_log "${plogs[index]}"
            fail "${names[index]} exited (status $rc) before $what; log: ${plogs[index]#"$repo"/}"
        fi
        if ((SECONDS >= deadline)); then
            show_log "${plogs[index]}"
            fail "timed out after $seconds s waiting for $what; log: ${plogs[index]#"$repo"/}"
        fi
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1"; }
log_has() { grep -qF -- "$2" "$1"; }

# ---------------------------------------------------------------------------------------------
# Before anything else: the ports must be free (a demo may still be running).

for spec in "$HS_PORT:Synapse" "$AS_PORT:the bridge's appservice API" \
    "$METRICS_PORT:the bridge's metrics" "$GW_PORT:the interop gateway"; do
    port=${spec%%:*}
    if port_open "$port"; then
        holder=""
        if command -v ss >/dev/null; then
            holder=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -n1 || true)
        fi
        fail "port $port (for ${spec#*:}) is already in use${holder:+ by $holder}. Is a demo still running? Stop it (Ctrl-C) or free the port."
    fi
done

for cmd in python3 curl node npm; do
    command -v "$cmd" >/dev/null || fail "$cmd is needed but not installed"
done
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
    || fail "Node.js 20 or newer is needed (found $(node --version))"

if ((reset)) && [[ -e $demo ]]; then
    note "wiping .demo/"
    rm -rf "$demo"
fi
mkdir -p "$logs" "$demo/gateway/blobs" "$demo/synapse"

# ---------------------------------------------------------------------------------------------
# What the demo needs: the binaries, Synapse's venv, the Node contact's packages.

if ((build)); then
    command -v cargo >/dev/null || fail "cargo is needed (https://rustup.rs), or pass --no-build"
    mib_ensure_protoc
    note "building the binaries (cargo build --bins; a first build takes several minutes)"
    (cd "$repo" && cargo build --bins --quiet)
fi
[[ -x $bridge_bin && -x $gateway_bin ]] \
    || fail "missing $bridge_bin or $gateway_bin: run without --no-build"

note "Synapse venv (scripts/ensure-synapse.sh)"
MIB_SYNAPSE_VENV=$(bash "$repo/scripts/ensure-synapse.sh")
export MIB_SYNAPSE_VENV
mib_ensure_peer_modules

# ---------------------------------------------------------------------------------------------
# The interop gateway: key created once, development mode with a fixed verification code.

gw_key=$demo/gateway/gateway.key
if [[ ! -f $gw_key ]]; then
    "$gateway_bin" generate-key --out "$gw_key" >/dev/null
    note "created the gateway key .demo/gateway/gateway.key"
fi
gw_public=$("$gateway_bin" public-key --key-file "$gw_key")

note "starting the interop gateway on 127.0.0.1:$GW_PORT"
start_bg gateway "$logs/gateway.log" "$gateway_bin" run \
    --listen "127.0.0.1:$GW_PORT" --key-file "$gw_key" \
    --database "sqlite://$demo/gateway/gateway.db" --blob-dir "$demo/gateway/blobs" \
    --dev-code "$DEV_CODE"
gw_index=$((${#pids[@]} - 1))

# ---------------------------------------------------------------------------------------------
# The bridge config: generated once, then the demo's values set on every run (comments kept).

config=$demo/config.yaml
registration=$demo/registration.yaml
if [[ ! -f $config ]]; then
    out=$("$bridge_bin" generate-config -o "$config" 2>&1) || fail "generate-config: $out"
    note "created .demo/config.yaml and .demo/vault.key"
fi

settings=$(python3 - "$demo" "$gw_public" <<PY
import json, sys
demo, gw_public = sys.argv[1:3]
print(json.dumps({
    "homeserver.address": "$HS_URL",
    "homeserver.domain": "$SERVER_NAME",
    "appservice.address": "http://127.0.0.1:$AS_PORT",
    "appservice.hostname": "127.0.0.1",
    "appservice.port": $AS_PORT,
    "database.type": "sqlite",
    "database.uri": "sqlite://" + demo + "/bridge.db",
    "bridge.permissions": {"*": "relay", "$SERVER_NAME": "user", "@$DEMO_USER:$SERVER_NAME": "admin"},
    "interop.gateway_address": "127.0.0.1:$GW_PORT",
    "interop.gateway_public_key": gw_public,
    "metrics.enabled": True,
    "metrics.listen": "127.0.0.1:$METRICS_PORT",
    # Element creates encrypted DMs by default: the bot answers in them, and portals are encrypted.
    "encryption.allow": True,
    "encryption.default": True,
}))
PY
)

# Sets dotted keys of a block-style YAML file in place. Scalars are written as JSON (valid YAML);
# a mapping value replaces the whole nested block. Fails if a key is not in the file.
python3 - "$config" "$settings" <<'PY'
import json, os, re, sys

path, settings = sys.argv[1], json.loads(sys.argv[2])
line_re = re.compile(r'^( *)("[^"]*"|\'[^\']*\'|[^\s:#][^:#]*?):(?:\s+(.*))?$')

PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./:@+-]*")
SPECIAL = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}

def scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    # Plain when YAML reads it back as the same string, as in the example config; quoted otherwise.
    if PLAIN.fullmatch(v) and v.lower() not in SPECIAL and not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", v):
        return v
    return json.dumps(v)

with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
out, stack, seen, skip_deeper_than = [], [], set(), None
for line in lines:
    indent = len(line) - len(line.lstrip(" "))
    if skip_deeper_than is not None:
        if line.strip() and indent > skip_deeper_than:
            continue
        skip_deeper_than = None
    m = line_re.match(line)
    if not line.strip() or line.lstrip().startswith("#") or not m:
        out.append(line)
        continue
    key = m.group(2).strip("\"'")
    while stack and stack[-1][0] >= indent:
        stack.pop()
    stack.append((indent, key))
    dotted = ".".join(k for _, k in stack)
    if dotted not in settings:
        out.append(line)
        continue
    seen.add(dotted)
    value = settings[dotted]
    pad = " " * indent
    if isinstance(value, dict):
        out.append(f"{pad}{m.group(2)}:")
        out.extend(f"{pad}    {json.dumps(k)}: {scalar(v)}" for k, v in value.items())
        skip_deeper_than = indent
    else:
        out.append(f"{pad}{m.group(2)}: {scalar(value)}")
missing = sorted(set(settings) - seen)
if missing:
    sys.exit(f"demo: {path} has no {', '.join(missing)}")
text = "\n".join(out) + "\n"
with open(path, encoding="utf-8") as f:
    changed = f.read() != text
if changed:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path + ".tmp", os.stat(path).st_mode & 0o777)
    os.replace(path + ".tmp", path)
PY

if [[ ! -f $registration ]] || grep -qF "This value is generated when generating the registration" "$config"; then
    out=$("$bridge_bin" generate-registration -c "$config" -o "$registration" 2>&1) \
        || fail "generate-registration: $out"
    note "created .demo/registration.yaml (and stored its tokens in .demo/config.yaml)"
fi

# ---------------------------------------------------------------------------------------------
# Synapse with the registration, and the demo user.

hs_out=$(bash "$repo/scripts/synapse-config.sh" "$demo/synapse" "$HS_PORT" "$registration" "$SERVER_NAME")
shared_secret=$(sed -n 's/^shared_secret=//p' <<<"$hs_out")
[[ -n $shared_secret ]] || fail "synapse-config.sh printed no shared_secret"

note "starting Synapse on $HS_URL"
start_bg synapse "$logs/synapse.log" bash "$repo/scripts/start-synapse.sh" "$demo/synapse"
wait_for "Synapse to answer" 90 $((${#pids[@]} - 1)) http_ok "$HS_URL/_matrix/client/versions"
wait_for "the gateway to listen on $GW_PORT" 30 "$gw_index" port_open "$GW_PORT"

bash "$repo/scripts/register-user.sh" "$HS_URL" "$shared_secret" "$DEMO_USER" "$DEMO_PASSWORD" >/dev/null \
    || fail "cannot register @$DEMO_USER:$SERVER_NAME"

# ---------------------------------------------------------------------------------------------
# The bridge, then the demo contact.

note "starting the bridge (appservice API on 127.0.0.1:$AS_PORT)"
start_bg bridge "$logs/bridge.log" "$bridge_bin" -c "$config"
bridge_index=$((${#pids[@]} - 1))
wait_for "the bridge's /health" 30 "$bridge_index" http_ok "http://127.0.0.1:$AS_PORT/health"
wait_for "the bridge to finish its start-up checks" 60 "$bridge_index" log_has "$logs/bridge.log" "bridge ready"

note "starting the demo contact $CONTACT (\"$CONTACT_NAME\")"
start_bg demo-contact "$logs/demo-contact.log" node "$repo/tests/peers/demo-contact.js" \
    --account "$CONTACT" --gateway "127.0.0.1:$GW_PORT" --server-key "$gw_public" \
    --code "$DEV_CODE" --name "$CONTACT_NAME" --state "$demo/demo-contact.json"
wait_for "the demo contact to be ready" 60 $((${#pids[@]} - 1)) log_has "$logs/demo-contact.log" '"event":"ready"'

up_ms=$(($(ms_now) - started_ms))
note "everything is up after $((up_ms / 1000)).$(printf '%03d' $((up_ms % 1000)) | cut -c1) s"

# ---------------------------------------------------------------------------------------------
# --check: as a user of its own (the demo user's chats stay as they are): open a DM with the bot,
# `ping`, log in with a fresh interop identifier and the dev code, `start-chat` with the demo
# contact, say hello, and wait for the contact's answer on Matrix; then log out and leave.
CHECK_USER=demo-check
CHECK_PASSWORD=demo-check

token=""
mx_status="" mx_body=""
# mx METHOD PATH [JSON]: a client-server API call as the demo user; sets mx_status and mx_body.
mx() {
    local method=$1 path=$2 body=${3:-} out
    local args=(-sS --max-time 30 -X "$method" -w '\n%{http_code}' -H 'Content-Type: application/json')
    [[ -n $body ]] && args+=(--data-binary "$body")
    # The access token goes through stdin, not the command line.
    out=$(printf 'header = "Authorization: Bearer %s"\n' "$token" | curl -K - "${args[@]}" "$HS_URL$path") \
        || return 1
    mx_status=${out##*$'\n'}
    mx_body=${out%$'\n'*}
}
# json EXPR: evaluates a Python expression over the JSON document `d` read from stdin.
# Further arguments are sys.argv[2:] for the expression.
json() { python3 -c 'import json, sys; d = json.load(sys.stdin); r = eval(sys.argv[1]); print(r if r is not None else "")' "$@"; }
urlenc() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }

# wait_body ROOM SENDER NEEDLE: waits up to 30 s for a message from SENDER in ROOM whose body
# contains NEEDLE; prints the body.
wait_body() {
    local room_path=/_matrix/client/v3/rooms/$(urlenc "$1") deadline=$((SECONDS + 30)) found=""
    while [[ -z $found ]]; do
        if mx GET "$room_path/messages?dir=b&limit=50" && [[ $mx_status == 200 ]]; then
            found=$(json "next((e['content']['body'] for e in d.get('chunk', []) if e.get('sender') == sys.argv[2]
                and sys.argv[3] in e.get('content', {}).get('body', '')), None)" "$2" "$3" <<<"$mx_body")
        fi
        [[ -n $found ]] && break
        ((SECONDS < deadline)) || { echo "nothing from $2 containing \"$3\" within 30 s"; return 1; }
        sleep 0.2
    done
    echo "$found"
}

# say ROOM TEXT: sends a text message.
say() {
    local body
    body=$(python3 -c 'import json, sys; print(json.dumps({"msgtype": "m.text", "body": sys.argv[1]}))' "$2")
    mx PUT "/_matrix/client/v3/rooms/$(urlenc "$1")/send/m.room.message/demo-check-$(date +%s%N)" "$body" \
        || return 1
    [[ $mx_status == 200 ]] || { echo "send: HTTP $mx_status $mx_body"; return 1; }
    echo "sent: $2"
}

run_check() {
    local body mgmt portal answer t0 identifier
    bash "$repo/scripts/register-user.sh" "$HS_URL" "$shared_secret" "$CHECK_USER" "$CHECK_PASSWORD" >/dev/null \
        || { echo "cannot register @$CHECK_USER:$SERVER_NAME"; return 1; }
    body=$(python3 -c 'import json, sys; print(json.dumps({"type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": sys.argv[1]}, "password": sys.argv[2],
        "initial_device_display_name": "demo.sh --check"}))' "$CHECK_USER" "$CHECK_PASSWORD")
    mx POST /_matrix/client/v3/login "$body" || return 1
    [[ $mx_status == 200 ]] || { echo "login as $CHECK_USER: HTTP $mx_status $mx_body"; return 1; }
    token=$(json 'd["access_token"]' <<<"$mx_body") || return 1
    echo "logged in as @$CHECK_USER:$SERVER_NAME"

    body=$(python3 -c 'import json, sys; print(json.dumps({"invite": [sys.argv[1]], "is_direct": True,
        "preset": "trusted_private_chat", "name": "demo.sh --check"}))' "$BOT")
    mx POST /_matrix/client/v3/createRoom "$body" || return 1
    [[ $mx_status == 200 ]] || { echo "createRoom: HTTP $mx_status $mx_body"; return 1; }
    mgmt=$(json 'd["room_id"]' <<<"$mx_body") || return 1
    echo "created $mgmt, inviting $BOT"
    wait_body "$mgmt" "$BOT" "management room" >/dev/null || return 1
    echo "the bot joined and greeted"

    t0=$(ms_now)
    say "$mgmt" ping || return 1
    answer=$(wait_body "$mgmt" "$BOT" "Pong") || { echo "$answer"; return 1; }
    echo "the bot answered after $(($(ms_now) - t0)) ms: $answer"

    # A check that stopped half-way may have left its login behind.
    say "$mgmt" logout >/dev/null || return 1
    wait_body "$mgmt" "$BOT" "ogged" >/dev/null || return 1
    identifier=+1555$(printf '%07d' $((RANDOM * 32768 + RANDOM)) | cut -c1-7)
    say "$mgmt" "login $identifier" || return 1
    wait_body "$mgmt" "$BOT" "verification code" >/dev/null || return 1
    say "$mgmt" "$DEV_CODE" || return 1
    answer=$(wait_body "$mgmt" "$BOT" "Logged in as") || { echo "$answer"; return 1; }
    echo "$answer"

    say "$mgmt" "start-chat $CONTACT" || return 1
    answer=$(wait_body "$mgmt" "$BOT" "Your chat with") || { echo "$answer"; return 1; }
    portal=${answer##*/#/}
    mx POST "/_matrix/client/v3/rooms/$(urlenc "$portal")/join" '{}' || return 1
    [[ $mx_status == 200 ]] || { echo "join $portal: HTTP $mx_status $mx_body"; return 1; }
    echo "joined the portal $portal"
    # Portals are encrypted (encryption.default): this client cannot read them, the encrypted
    # check below talks in one.
    mx GET "/_matrix/client/v3/rooms/$(urlenc "$portal")/state/m.room.encryption/" || return 1
    [[ $mx_status == 200 ]] || { echo "the portal is not encrypted: HTTP $mx_status $mx_body"; return 1; }
    echo "the portal is encrypted"

    http_ok "http://127.0.0.1:$AS_PORT/ready" || { echo "the bridge's /ready does not answer 200"; return 1; }
    echo "the bridge's /ready answers 200"

    # The same with an encrypting client: an encrypted DM with the bot and an encrypted portal.
    bash "$repo/scripts/register-user.sh" "$HS_URL" "$shared_secret" "$CHECK_USER-e2ee" "$CHECK_PASSWORD" >/dev/null \
        || { echo "cannot register @$CHECK_USER-e2ee:$SERVER_NAME"; return 1; }
    timeout 300 "$MIB_SYNAPSE_VENV/bin/python" "$repo/scripts/demo-check-e2ee.py" "$HS_URL" "$CHECK_USER-e2ee" \
        "$CHECK_PASSWORD" "$BOT" "$CONTACT" "$DEV_CODE" "@interop_${CONTACT#+}:$SERVER_NAME" || return 1

    # Tidy up: log the check's interop account out, leave the rooms, end the session.
    say "$mgmt" logout >/dev/null || true
    wait_body "$mgmt" "$BOT" "Logged out" >/dev/null || true
    for r in "$portal" "$mgmt"; do
        mx POST "/_matrix/client/v3/rooms/$(urlenc "$r")/leave" '{}' || true
        mx POST "/_matrix/client/v3/rooms/$(urlenc "$r")/forget" '{}' || true
    done
    mx POST /_matrix/client/v3/logout '{}' || true
}

if ((check)); then
    note "check: as @$CHECK_USER: ping the bot, log in, start-chat $CONTACT; then with an encrypting client, the same in an encrypted DM and the contact's answer in the encrypted portal"
    if run_check 2>&1 | sed 's/^/check: /'; then
        total_ms=$(($(ms_now) - started_ms))
        note "PASS (total $((total_ms / 1000)) s)"
        exit 0
    fi
    for log in "$logs/bridge.log" "$logs/synapse.log"; do show_log "$log"; done
    note "FAIL"
    exit 1
fi

cat <<EOF

========================================================================================
 The demo is running. Press Ctrl-C to stop it (state stays in .demo/; --reset wipes it).

 1. Log in with any Matrix client (e.g. Element):
      homeserver  $HS_URL
      user        $DEMO_USER
      password    $DEMO_PASSWORD
 2. Start a direct chat with $BOT and send:
      help
      login +15550000001          then the code $DEV_CODE (the gateway runs in demo mode)
      start-chat $CONTACT   the bot invites you to a chat with "$CONTACT_NAME",
                                  who reacts to every text and echoes it

 Logs:    .demo/logs/gateway.log  synapse.log  bridge.log  demo-contact.log
          (Synapse's full log: .demo/synapse/homeserver.log)
 Bridge:  http://127.0.0.1:$AS_PORT/health  /ready    metrics: http://127.0.0.1:$METRICS_PORT/metrics
 Config:  .demo/config.yaml   registration: .demo/registration.yaml
========================================================================================

EOF

while true; do
    for i in "${!pids[@]}"; do
        if ! alive "${pids[i]}"; then
            rc=0
            wait "${pids[i]}" || rc=$?
            show_log "${plogs[i]}"
            fail "${names[i]} stopped (status $rc); log: ${plogs[i]#"$repo"/}"
        fi
    done
    sleep 1
done
