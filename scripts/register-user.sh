#!/usr/bin/env bash
# Register a user through Synapse's shared-secret admin API.
#
#   scripts/register-user.sh HS_URL SHARED_SECRET LOCALPART PASSWORD [--admin]
#
# Prints the full user id. Idempotent: if the user already exists, it logs in with
# PASSWORD to confirm the account is usable (then logs that session out) and succeeds;
# it fails only if the existing account has a different password.
# Needs nothing but Python 3's standard library.
set -euo pipefail

usage() { echo "usage: $0 HS_URL SHARED_SECRET LOCALPART PASSWORD [--admin]" >&2; exit 2; }
[[ $# -eq 4 || ($# -eq 5 && $5 == --admin) ]] || usage

python=python3
if [[ -n ${MIB_SYNAPSE_VENV:-} && -x $MIB_SYNAPSE_VENV/bin/python ]]; then
    python=$MIB_SYNAPSE_VENV/bin/python
fi

exec "$python" - "$@" <<'PY'
import hashlib, hmac, json, sys, urllib.error, urllib.request

base, secret, localpart, password = sys.argv[1:5]
admin = sys.argv[5:] == ["--admin"]
base = base.rstrip("/")


def call(method, path, body=None, token=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"error": raw.decode(errors="replace")}


def fail(msg):
    print(f"register-user: {msg}", file=sys.stderr)
    sys.exit(1)


path = "/_synapse/admin/v1/register"
status, body = call("GET", path)
if status != 200 or "nonce" not in body:
    fail(f"GET {path}: {status} {body}")
nonce = body["nonce"]

mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
for part in (nonce, localpart, password):
    mac.update(part.encode() + b"\x00")
mac.update(b"admin" if admin else b"notadmin")

status, body = call("POST", path, {
    "nonce": nonce,
    "username": localpart,
    "password": password,
    "admin": admin,
    "mac": mac.hexdigest(),
})
if status == 200:
    print(body["user_id"])
    sys.exit(0)
if body.get("errcode") != "M_USER_IN_USE":
    fail(f"POST {path}: {status} {body}")

# Already registered: check the password works, and report the full user id.
status, body = call("POST", "/_matrix/client/v3/login", {
    "type": "m.login.password",
    "identifier": {"type": "m.id.user", "user": localpart},
    "password": password,
    "initial_device_display_name": "register-user.sh",
})
if status != 200:
    fail(f"{localpart} exists but logging in with the given password failed: {status} {body}")
call("POST", "/_matrix/client/v3/logout", {}, token=body["access_token"])
print(body["user_id"])
PY
