#!/usr/bin/env python3
"""Self-test of e2ee_client.py against a real, throwaway Synapse.

    $VENV/bin/python tests/peers/e2ee_selftest.py [--keep]

($VENV from scripts/ensure-synapse.sh.) Starts Synapse on a free loopback port in a temporary
directory (scripts/synapse-config.sh and scripts/start-synapse.sh, with a dummy appservice
registration), registers two users, and drives three agents: alice, bob, and later a second device
of bob. It checks an encrypted DM (text and encrypted images both ways, decrypted on both sides,
image bytes equal), the /keys/query view with cross-signing, that bob's second device reads what is
sent after it logged in (and sees older messages as undecryptable), a plain room (unencrypted text
and media, then m.room.encryption turned on), and the JSON-lines protocol itself.

Prints one line per check and per timed step, then "N passed, M failed"; exits non-zero on any
failure. Synapse and the agents are stopped in every case; the temporary directory is removed on
success (kept on failure, or with --keep, and its path printed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import vodozemac

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
AGENT = HERE / "e2ee_client.py"
SERVER = "localhost"


class Failed(Exception):
    """A check or a step failed in a way that stops the run."""


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.timings: list[tuple[str, float]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok    {name}", flush=True)
        else:
            self.failed += 1
            print(f"  FAIL  {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    def must(self, name: str, ok: bool, detail: str = "") -> None:
        if not self.check(name, ok, detail):
            raise Failed(name)

    def timed(self, name: str):
        results = self

        class Timer:
            def __enter__(self):
                self.t0 = time.monotonic()
                return self

            def __exit__(self, *exc):
                dt = time.monotonic() - self.t0
                results.timings.append((name, dt))
                print(f"  time  {name}: {dt:.2f} s", flush=True)
                return False

        return Timer()


# ----- Synapse ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, token: str | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"error": raw.decode(errors="replace")}


class Synapse:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "hs"
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.shared_secret = ""
        self.env = dict(os.environ)
        # Run by the tests' venv: let the scripts use it instead of checking it again.
        if (Path(sys.prefix) / ".mib-stamp").is_file():
            self.env["MIB_SYNAPSE_VENV"] = sys.prefix

    def write_registration(self) -> Path:
        # A dummy appservice (Synapse's test config loads one): its URL is a closed port, and no
        # user of this test is in its namespace, so Synapse never needs to reach it.
        path = self.workdir / "registration.yaml"
        path.write_text(
            "id: e2ee-selftest\n"
            f"url: http://127.0.0.1:{free_port()}\n"
            f"as_token: {secrets.token_hex(16)}\n"
            f"hs_token: {secrets.token_hex(16)}\n"
            "sender_localpart: selftest_bridge_bot\n"
            "rate_limited: false\n"
            "receive_ephemeral: true\n"
            "de.sorunome.msc2409.push_ephemeral: true\n"
            "push_ephemeral: true\n"
            "org.matrix.msc3202: true\n"
            "io.element.msc4190: true\n"
            "namespaces:\n"
            "  users:\n"
            "    - regex: '@selftest_bridge_.*:localhost'\n"
            "      exclusive: true\n"
            "  aliases: []\n"
            "  rooms: []\n"
        )
        return path

    def start(self, timeout: float = 120) -> None:
        registration = self.write_registration()
        out = subprocess.run(
            ["bash", str(REPO / "scripts/synapse-config.sh"), str(self.dir), str(self.port), str(registration), SERVER],
            env=self.env, capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            raise Failed(f"synapse-config.sh failed: {out.stderr.strip()}")
        values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        self.shared_secret = values["shared_secret"]
        log = open(self.workdir / "synapse.out", "wb")
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "scripts/start-synapse.sh"), str(self.dir)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(f"Synapse exited with {self.proc.returncode}; see {self.workdir / 'synapse.out'}")
            try:
                status, _ = http("GET", f"{self.url}/_matrix/client/versions", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise Failed(f"Synapse did not answer within {timeout:g} s")

    def register(self, localpart: str, password: str) -> str:
        out = subprocess.run(
            ["bash", str(REPO / "scripts/register-user.sh"), self.url, self.shared_secret, localpart, password],
            env=self.env, capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            raise Failed(f"register-user.sh {localpart}: {out.stderr.strip()}")
        return out.stdout.strip()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # start-synapse.sh execs Synapse: this is Synapse's own pid
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ----- agents ------------------------------------------------------------------------------------


class Peer:
    """One e2ee_client.py process: numbered requests, replies matched by "req", events collected."""

    def __init__(self, name: str, logdir: Path) -> None:
        self.name = name
        self.logdir = logdir
        self.proc: asyncio.subprocess.Process | None = None
        self.next_req = 0
        self.waiting: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []
        self.stray: list[str] = []
        self.replies = 0
        self.reader: asyncio.Task | None = None

    async def start(self) -> None:
        stderr = open(self.logdir / f"{self.name}.stderr", "wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(AGENT), "--sync-timeout", "5000",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            limit=64 * 1024 * 1024,
        )
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        assert self.proc and self.proc.stdout
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                self.stray.append(line.decode(errors="replace"))
                continue
            if isinstance(msg, dict) and "event" in msg and "ok" not in msg:
                self.events.append(msg)
            elif isinstance(msg, dict) and "ok" in msg and msg.get("req") in self.waiting:
                self.replies += 1
                fut = self.waiting.pop(msg["req"])
                if not fut.done():
                    fut.set_result(msg)
            else:
                self.stray.append(line.decode(errors="replace"))
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(Failed(f"{self.name}: agent exited"))

    async def raw(self, cmd: str, reply_within: float = 60, **args) -> dict:
        assert self.proc and self.proc.stdin
        self.next_req += 1
        req = self.next_req
        fut = asyncio.get_running_loop().create_future()
        self.waiting[req] = fut
        self.proc.stdin.write((json.dumps({"cmd": cmd, "req": req, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            return await asyncio.wait_for(fut, reply_within)
        except asyncio.TimeoutError:
            self.waiting.pop(req, None)
            raise Failed(f"{self.name} {cmd}: no reply within {reply_within:g} s")

    async def call(self, cmd: str, reply_within: float = 60, **args) -> dict:
        """Like raw(), but a reply with "ok": false raises. `timeout` and the rest go to the agent."""
        reply = await self.raw(cmd, reply_within, **args)
        if not reply.get("ok"):
            raise Failed(f"{self.name} {cmd}: {reply.get('error')}")
        return reply

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                await self.raw("quit", reply_within=15)
            except Exception:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader:
            await self.reader


# ----- helpers -------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of random pixels (incompressible, so about 3 * width * height bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + os.urandom(3 * width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def canonical_json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def bootstrap_cross_signing(base: str, user_id: str, localpart: str, password: str, token: str,
                            device_id: str) -> None:
    """Give user_id a master and a self-signing key and sign device_id with the latter, as a client
    that sets up cross-signing does (the keys are vodozemac ed25519 keys)."""
    master, ssk = vodozemac.Account(), vodozemac.Account()
    mpub, spub = master.ed25519_key.to_base64(), ssk.ed25519_key.to_base64()
    master_key = {"user_id": user_id, "usage": ["master"], "keys": {f"ed25519:{mpub}": mpub}}
    ssk_key = {"user_id": user_id, "usage": ["self_signing"], "keys": {f"ed25519:{spub}": spub}}
    ssk_key["signatures"] = {user_id: {f"ed25519:{mpub}": master.sign(canonical_json(ssk_key)).to_base64()}}
    body = {"master_key": master_key, "self_signing_key": ssk_key}
    status, resp = http("POST", f"{base}/_matrix/client/v3/keys/device_signing/upload", body, token)
    if status == 401:  # user-interactive auth
        body["auth"] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
            "session": resp.get("session"),
        }
        status, resp = http("POST", f"{base}/_matrix/client/v3/keys/device_signing/upload", body, token)
    if status != 200:
        raise Failed(f"device_signing/upload: {status} {resp}")
    status, resp = http("POST", f"{base}/_matrix/client/v3/keys/query", {"device_keys": {user_id: [device_id]}}, token)
    if status != 200:
        raise Failed(f"keys/query: {status} {resp}")
    device = resp["device_keys"][user_id][device_id]
    device.pop("unsigned", None)
    unsigned = {k: v for k, v in device.items() if k != "signatures"}
    signature = ssk.sign(canonical_json(unsigned)).to_base64()
    signed = {**unsigned, "signatures": {user_id: {f"ed25519:{spub}": signature}}}
    status, resp = http("POST", f"{base}/_matrix/client/v3/keys/signatures/upload", {user_id: {device_id: signed}}, token)
    if status != 200 or resp.get("failures"):
        raise Failed(f"signatures/upload: {status} {resp}")


def has_event_line(peer: Peer, event_id: str, **want) -> bool:
    for ev in peer.events:
        if ev.get("event") == "room_event" and ev.get("event_id") == event_id:
            if all(ev.get(k) == v for k, v in want.items()):
                return True
    return False


# ----- the test ----------------------------------------------------------------------------------------


async def scenario(r: Results, hs: Synapse, workdir: Path, peers: list[Peer]) -> None:
    with r.timed("start Synapse"):
        await asyncio.to_thread(hs.start)
    r.check("Synapse answers /versions", True)

    pw_alice, pw_bob = secrets.token_hex(8), secrets.token_hex(8)
    with r.timed("register two users"):
        alice = await asyncio.to_thread(hs.register, "alice", pw_alice)
        bob = await asyncio.to_thread(hs.register, "bob", pw_bob)
    r.must("users registered", (alice, bob) == (f"@alice:{SERVER}", f"@bob:{SERVER}"), f"{alice} {bob}")

    A, B = Peer("alice", workdir), Peer("bob", workdir)
    peers += [A, B]
    await A.start()
    await B.start()

    unknown = await A.raw("frobnicate")
    r.check("unknown command: ok false, req echoed", unknown.get("ok") is False and "error" in unknown)
    early = await A.raw("messages", room_id="!x:localhost")
    r.check("command before login is refused", early.get("ok") is False and "not logged in" in early.get("error", ""))

    with r.timed("login alice and bob (keys upload + initial sync)"):
        la, lb = await asyncio.gather(
            A.call("login", homeserver=hs.url, user="alice", password=pw_alice, device_id="ALICE1"),
            B.call("login", homeserver=hs.url, user="bob", password=pw_bob, device_id="BOB1"),
        )
    r.must("login returns user and device", (la["user_id"], la["device_id"], lb["user_id"], lb["device_id"])
           == (alice, "ALICE1", bob, "BOB1"), json.dumps([la, lb]))
    bad = await A.raw("login", homeserver=hs.url, user="alice", password="wrong")
    r.check("second login on one agent is refused", bad.get("ok") is False)

    # ---- encrypted DM ----------------------------------------------------------------------
    with r.timed("create encrypted DM, bob accepts the invite"):
        room = (await A.call("create_room", invite=[bob], encrypted=True, is_direct=True, name="selftest DM"))["room_id"]
        inv = await B.call("wait_invite", timeout=30, join=True)
        await A.call("wait_event", room_id=room, type="m.room.member", state_key=bob, membership="join", timeout=30)
    r.must("invite seen by bob", inv["room_id"] == room and inv["sender"] == alice, json.dumps(inv))
    r.check("invite is flagged direct", inv["is_direct"] is True)
    r.check("invite event line", any(e.get("event") == "invite" and e.get("room_id") == room for e in B.events))
    mem = await A.call("members", room_id=room)
    r.check("room is encrypted with both members joined", mem["encrypted"] and set(mem["joined"]) == {alice, bob},
            json.dumps(mem))
    created = await A.call("messages", room_id=room)
    r.check("m.room.encryption is part of the creation state",
            any(e["type"] == "m.room.encryption" and e["content"].get("algorithm") == "m.megolm.v1.aes-sha2"
                for e in created["events"]))

    with r.timed("encrypted text alice -> bob (send + decrypt)"):
        s1 = await A.call("send_text", room_id=room, body="hello bob, this is encrypted", html="<b>hello</b> bob")
        e1 = (await B.call("wait_event", room_id=room, body_contains="hello bob, this is encrypted", timeout=30))["event"]
    r.check("alice's send was encrypted", s1["encrypted"] is True)
    r.check("bob decrypted alice's text", e1["decrypted"] is True and e1["type"] == "m.room.message"
            and e1["sender"] == alice and e1["event_id"] == s1["event_id"], json.dumps(e1))
    r.check("html survives", e1["content"].get("formatted_body") == "<b>hello</b> bob"
            and e1["content"].get("format") == "org.matrix.custom.html")
    r.check("bob's agent wrote a decrypted room_event line", has_event_line(B, s1["event_id"], decrypted=True))
    own = (await A.call("wait_event", room_id=room, event_id=s1["event_id"], timeout=30))["event"]
    r.check("alice decrypts her own echo", own["decrypted"] is True and own["content"]["body"].startswith("hello bob"))

    with r.timed("encrypted text bob -> alice"):
        s2 = await B.call("send_text", room_id=room, body="hi alice, encrypted reply")
        e2 = (await A.call("wait_event", room_id=room, body_contains="encrypted reply", sender=bob, timeout=30))["event"]
    r.check("alice decrypted bob's text", s2["encrypted"] and e2["decrypted"] and e2["event_id"] == s2["event_id"],
            json.dumps(e2))

    img_a = noise_png(220, 220)
    with r.timed("encrypted image alice -> bob (upload, send, download, decrypt)"):
        si = await A.call("send_image", room_id=room, bytes_b64=b64(img_a), mimetype="image/png", filename="alice.png")
        ei = (await B.call("wait_event", room_id=room, msgtype="m.image", sender=alice, timeout=30))["event"]
        di = await B.call("download", content=ei["content"])
    r.check("image content has file (EncryptedFile), no url", "file" in si["content"] and "url" not in si["content"])
    f = ei["content"].get("file") or {}
    r.check("EncryptedFile fields", f.get("url", "").startswith("mxc://") and f.get("v") == "v2"
            and f.get("key", {}).get("alg") == "A256CTR" and "sha256" in f.get("hashes", {}) and "iv" in f,
            json.dumps(f))
    r.check("bob decrypted the image event", ei["decrypted"] is True and ei["event_id"] == si["event_id"])
    r.check("bob's image bytes match", base64.b64decode(di["bytes_b64"]) == img_a
            and di["sha256"] == hashlib.sha256(img_a).hexdigest(), f"size {di.get('size')}")
    r.check("download went through nio (authenticated media)", di["via"] == "nio", di["via"])
    raw = await B.call("download", content=ei["content"], raw=True)
    raw_bytes = base64.b64decode(raw["bytes_b64"])
    r.check("stored media is ciphertext", len(raw_bytes) == len(img_a) and raw_bytes != img_a)
    tampered = copy.deepcopy(ei["content"])
    tampered["file"]["hashes"]["sha256"] = base64.b64encode(b"\0" * 32).decode().rstrip("=")
    bad = await B.raw("download", content=tampered)
    r.check("a wrong hash is refused", bad.get("ok") is False and "decryption failed" in bad.get("error", ""),
            json.dumps(bad)[:200])

    img_b = noise_png(100, 120)
    with r.timed("encrypted image bob -> alice"):
        sj = await B.call("send_image", room_id=room, bytes_b64=b64(img_b), mimetype="image/png", filename="bob.png")
        ej = (await A.call("wait_event", room_id=room, msgtype="m.image", sender=bob, timeout=30))["event"]
        dj = await A.call("download", content=ej["content"])
    r.check("alice's image bytes match", ej["decrypted"] and ej["event_id"] == sj["event_id"]
            and base64.b64decode(dj["bytes_b64"]) == img_b)

    # ---- keys and cross-signing ----------------------------------------------------------------
    kq = await A.call("keys_query", user_id=bob)
    dev = kq["devices"].get("BOB1", {})
    r.check("keys_query lists bob's device with its keys", "ed25519:BOB1" in dev.get("keys", {})
            and "curve25519:BOB1" in dev.get("keys", {}) and dev.get("self_signed") is True, json.dumps(kq)[:300])
    r.check("no cross-signing yet", kq["master_keys"] is None and dev.get("cross_signed") is False)
    token_b = (await B.call("whoami"))["access_token"]
    with r.timed("bootstrap cross-signing for bob"):
        await asyncio.to_thread(bootstrap_cross_signing, hs.url, bob, "bob", pw_bob, token_b, "BOB1")
    kq = await A.call("keys_query", user_id=bob)
    r.check("master and self-signing keys reported", bool(kq["master_keys"]) and bool(kq["self_signing_keys"]))
    r.check("self-signing key is signed by the master key", kq["self_signing_key_signed_by_master"] is True)
    r.check("BOB1 is signed by bob's self-signing key", kq["devices"]["BOB1"]["cross_signed"] is True)

    # ---- a second device of bob -------------------------------------------------------------------
    C = Peer("bob2", workdir)
    peers.append(C)
    await C.start()
    with r.timed("login bob's second device"):
        lc = await C.call("login", homeserver=hs.url, user="bob", password=pw_bob, device_id="BOB2")
    r.must("second device logged in", lc["device_id"] == "BOB2" and lc["user_id"] == bob)
    old = (await C.call("messages", room_id=room))["events"]
    undecryptable = [e for e in old if e.get("undecryptable")]
    r.check("older messages are undecryptable on the new device", len(undecryptable) >= 2
            and all(e["type"] == "m.room.encrypted" and e.get("session_id") for e in undecryptable)
            and not any("hello bob" in str(e["content"].get("body", "")) for e in old), f"{len(undecryptable)} undecryptable")
    r.check("undecryptable room_event lines written", any(e.get("undecryptable") for e in C.events))

    with r.timed("alice -> bob's two devices after the new login"):
        s3 = await A.call("send_text", room_id=room, body="after the second device logged in")
        e3c = (await C.call("wait_event", room_id=room, body_contains="after the second device", timeout=30))["event"]
        e3b = (await B.call("wait_event", room_id=room, body_contains="after the second device", timeout=30))["event"]
    r.check("second device decrypts a message sent after its login", e3c["decrypted"] and e3c["event_id"] == s3["event_id"],
            json.dumps(e3c))
    r.check("first device still decrypts", e3b["decrypted"] and e3b["event_id"] == s3["event_id"])

    with r.timed("second device -> alice and bob's first device"):
        s4 = await C.call("send_text", room_id=room, body="from bob's second device")
        e4a = (await A.call("wait_event", room_id=room, body_contains="from bob's second device", timeout=30))["event"]
        e4b = (await B.call("wait_event", room_id=room, body_contains="from bob's second device", timeout=30))["event"]
    r.check("alice decrypts the second device's message", e4a["decrypted"] and e4a["sender"] == bob
            and e4a["event_id"] == s4["event_id"])
    r.check("bob's first device decrypts his second device's message", e4b["decrypted"] is True)
    with r.timed("key export on BOB1, import on BOB2 (late decryption)"):
        keyfile = str(workdir / "bob-keys.txt")
        await B.call("export_keys", path=keyfile, passphrase="selftest")
        lines_before = len(C.events)
        imp = await C.call("import_keys", path=keyfile, passphrase="selftest")
        late = (await C.call("wait_event", room_id=room, event_id=s1["event_id"], decrypted=True, timeout=5))["event"]
    r.check("imported keys decrypt the old messages", imp["decrypted_late"] >= 2 and imp["still_undecryptable"] == 0
            and late["content"].get("body") == "hello bob, this is encrypted", json.dumps(imp))
    r.check("late decryptions are reported with late: true",
            any(e.get("late") and e.get("event_id") == s1["event_id"] for e in C.events[lines_before:]))
    old = (await C.call("messages", room_id=room))["events"]
    r.check("messages now holds the decrypted forms", not any(e.get("undecryptable") for e in old))

    kq = await A.call("keys_query", user_id=bob)
    r.check("keys_query: BOB2 listed, not cross-signed; BOB1 still is",
            set(kq["devices"]) >= {"BOB1", "BOB2"} and kq["devices"]["BOB2"]["cross_signed"] is False
            and kq["devices"]["BOB1"]["cross_signed"] is True)

    # ---- a plain room, then encryption turned on --------------------------------------------------
    with r.timed("plain room: create, join"):
        plain = (await A.call("create_room", invite=[bob], encrypted=False, name="plain"))["room_id"]
        inv = await B.call("wait_invite", timeout=30)
        await B.call("join", room_id=inv["room_id"])
        await A.call("wait_event", room_id=plain, type="m.room.member", state_key=bob, membership="join", timeout=30)
    r.check("plain invite is not direct", inv["room_id"] == plain and inv["is_direct"] is False)
    sp = await A.call("send_text", room_id=plain, body="plain hello")
    ep = (await B.call("wait_event", room_id=plain, body_contains="plain hello", timeout=30))["event"]
    r.check("unencrypted text arrives as is", sp["encrypted"] is False and ep["decrypted"] is False
            and ep["type"] == "m.room.message")
    img_p = noise_png(64, 64)
    spi = await A.call("send_image", room_id=plain, bytes_b64=b64(img_p), mimetype="image/png", filename="plain.png")
    epi = (await B.call("wait_event", room_id=plain, msgtype="m.image", timeout=30))["event"]
    dpi = await B.call("download", content=epi["content"])
    r.check("unencrypted image: url, no file, bytes match", "url" in spi["content"] and "file" not in spi["content"]
            and base64.b64decode(dpi["bytes_b64"]) == img_p and dpi["encrypted"] is False)

    with r.timed("enable encryption in the plain room, both ways"):
        enc = await A.call("enable_encryption", room_id=plain)
        await B.call("wait_event", room_id=plain, type="m.room.encryption", timeout=30)
        s5 = await A.call("send_text", room_id=plain, body="now it is encrypted")
        e5 = (await B.call("wait_event", room_id=plain, body_contains="now it is encrypted", timeout=30))["event"]
        s6 = await B.call("send_text", room_id=plain, body="encrypted answer")
        e6 = (await A.call("wait_event", room_id=plain, body_contains="encrypted answer", timeout=30))["event"]
    r.check("enable_encryption returns an event id", enc["event_id"].startswith("$"))
    r.check("messages after enable_encryption are encrypted both ways", s5["encrypted"] and e5["decrypted"]
            and s6["encrypted"] and e6["decrypted"])

    # ---- messages, wait_event details --------------------------------------------------------------
    msgs = (await B.call("messages", room_id=room))["events"]
    ids = [e["event_id"] for e in msgs]
    order = [s1["event_id"], s2["event_id"], si["event_id"], sj["event_id"], s3["event_id"], s4["event_id"]]
    r.check("messages: all events, oldest first", all(i in ids for i in order)
            and [ids.index(i) for i in order] == sorted(ids.index(i) for i in order))
    r.check("messages: every room message decrypted on bob's first device",
            all(e["decrypted"] for e in msgs if e["type"] == "m.room.message"))
    after = await B.raw("wait_event", room_id=room, sender=alice, after=s4["event_id"], timeout=1)
    r.check("wait_event with after= times out when nothing newer matches",
            after.get("ok") is False and "timed out" in after.get("error", ""))

    # ---- protocol hygiene and shutdown ------------------------------------------------------------
    lo = await C.raw("logout")
    r.check("logout", lo.get("ok") is True, json.dumps(lo))
    for p in peers:
        await p.stop()
        r.check(f"{p.name}: one reply per command, no stray output",
                not p.stray and p.replies == p.next_req, f"{p.replies}/{p.next_req} replies, stray {p.stray[:2]}")
        r.check(f"{p.name}: exit status 0", p.proc.returncode == 0, str(p.proc.returncode))
        errors = [e for e in p.events if e.get("event") in ("sync_error", "agent_error")]
        r.check(f"{p.name}: no sync or agent errors", not errors, json.dumps(errors[:2]))


async def amain(args) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="e2ee-selftest-"))
    print(f"workdir {workdir}", flush=True)
    r = Results()
    hs = Synapse(workdir)
    peers: list[Peer] = []
    t0 = time.monotonic()
    try:
        await scenario(r, hs, workdir, peers)
    except Failed as err:
        r.check("scenario completed", False, str(err))
    except Exception as err:  # a bug in the test itself still counts
        r.check("scenario completed", False, f"{type(err).__name__}: {err}")
    finally:
        for p in peers:
            try:
                await asyncio.wait_for(p.stop(), 30)
            except Exception:
                if p.proc and p.proc.returncode is None:
                    p.proc.kill()
        with r.timed("stop Synapse"):
            await asyncio.to_thread(hs.stop)
    print(f"total {time.monotonic() - t0:.1f} s", flush=True)
    if r.failed == 0 and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept {workdir} (Synapse log: hs/homeserver.log; agent stderr: *.stderr)", flush=True)
    print(f"{r.passed} passed, {r.failed} failed", flush=True)
    return 0 if r.failed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    # Stop cleanly (Synapse too) on Ctrl-C or SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
