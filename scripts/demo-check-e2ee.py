#!/usr/bin/env python3
"""The encrypted half of `scripts/demo.sh --check`: as a Matrix user with an end-to-end-encrypted
client (matrix-nio, through tests/peers/e2ee_client.py), open an encrypted DM with the bridge bot,
log in, start a chat with the demo contact in an encrypted portal and expect its answer. Every
message both ways must have been encrypted.

    demo-check-e2ee.py HOMESERVER USER PASSWORD BOT CONTACT CODE GHOST

Run with the Synapse venv's python (it has matrix-nio). Prints one line per step; exits non-zero
with the reason when a step fails.
"""

import json
import os
import random
import subprocess
import sys
import time

HOMESERVER, USER, PASSWORD, BOT, CONTACT, CODE, GHOST = sys.argv[1:8]
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "peers", "e2ee_client.py")

proc = subprocess.Popen(
    [sys.executable, CLIENT, "--sync-timeout", "2000"],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
)


def call(cmd, **args):
    """One command; its reply (event lines on the way are skipped)."""
    args["cmd"] = cmd
    proc.stdin.write(json.dumps(args) + "\n")
    proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        if not line:
            sys.exit(f"the encrypted client stopped during {cmd}")
        reply = json.loads(line)
        if "ok" not in reply:
            continue  # an event line from the sync loop
        if not reply.get("ok"):
            sys.exit(f"{cmd}: {reply.get('error')}")
        return reply


def wait(room, sender, text):
    event = call("wait_event", room_id=room, sender=sender, body_contains=text, timeout=60)["event"]
    if event.get("decrypted") is not True:
        sys.exit(f"the message containing {text!r} was not encrypted: {event}")
    return event


def main():
    started = time.monotonic()
    # A new device each run (a run that stopped half-way leaves its device and keys behind).
    device = "DEMOCHECK" + "".join(random.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(6))
    call("login", homeserver=HOMESERVER, user=USER, password=PASSWORD, device_id=device)
    print(f"logged in as {USER} with an encrypting client")
    mgmt = call("create_room", invite=[BOT], encrypted=True, is_direct=True, name="demo.sh --check (encrypted)")["room_id"]
    wait(mgmt, BOT, "management room")
    print(f"encrypted DM {mgmt}: the bot joined and greeted, encrypted")
    account = "+1555" + "".join(random.choice("0123456789") for _ in range(7))
    call("send_text", room_id=mgmt, body=f"login {account}")
    wait(mgmt, BOT, "verification code")
    call("send_text", room_id=mgmt, body=CODE)
    wait(mgmt, BOT, "Logged in as")
    print(f"logged in as {account} through the encrypted DM")
    call("send_text", room_id=mgmt, body=f"start-chat {CONTACT}")
    link = wait(mgmt, BOT, "Your chat with")
    portal = link["content"]["body"].rsplit("/#/", 1)[-1]
    call("join", room_id=portal)
    if call("members", room_id=portal).get("encrypted") is not True:
        sys.exit(f"the portal {portal} is not encrypted")
    print(f"joined the encrypted portal {portal}")
    sent = call("send_text", room_id=portal, body="hello, encrypted")
    if sent.get("encrypted") is not True:
        sys.exit("the message into the portal was not encrypted")
    wait(portal, GHOST, "You said: hello, encrypted")
    print(f"the demo contact answered, encrypted ({time.monotonic() - started:.1f} s in all)")
    call("send_text", room_id=mgmt, body="logout")
    wait(mgmt, BOT, "Logged out")
    for room in (portal, mgmt):
        call("leave", room_id=room)
    call("logout")


try:
    main()
finally:
    try:
        proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        proc.stdin.flush()
    except OSError:
        pass
    proc.wait(timeout=10)
