#!/usr/bin/env python3
"""An end-to-end-encrypted Matrix client driven by JSON lines, for the end-to-end tests.

Run it with the tests' venv (scripts/ensure-synapse.sh, matrix-nio[e2e] 0.26):

    $VENV/bin/python tests/peers/e2ee_client.py [--store DIR] [--sync-timeout MS (5000)] [--verbose]

One command per line on stdin, ``{"cmd": "<name>", ...args}``; exactly one reply line per command on
stdout, ``{"ok": true, ...result}`` or ``{"ok": false, "error": "..."}``, with the optional ``"req"``
value copied into it. Commands run one at a time, in order. Event lines (``{"event": ...}``) are
written at any time by the background sync loop. Bytes are base64 everywhere; timeouts are seconds.

Commands (arguments, then result fields):

  login            homeserver, user, password, device_id?, device_name?   user_id, device_id
  whoami           -                                   user_id, device_id, access_token, identity_keys
  create_room      invite?, encrypted? (true), is_direct? (false), name?, topic?   room_id
  join             room_id                                                room_id
  wait_invite      timeout? (30), join? (false)                           room_id, sender, is_direct
  invite / leave   room_id, user_id / room_id                             -
  send_text        room_id, body, html?, msgtype? (m.text), extra?        event_id, encrypted
  send_event       room_id, type, content                                 event_id, encrypted
  send_image       room_id, bytes_b64, mimetype, filename, msgtype? (m.image), info?, body?
                                                                          event_id, encrypted, content
  download         content (m.image/m.file content as received) or mxc, raw? (false)
                                                                          bytes_b64, size, sha256, encrypted, via
  messages         room_id                                                events (oldest first)
  wait_event       room_id?, type?, sender?, body_contains?, msgtype?, event_id?, state_key?,
                   membership?, decrypted?, undecryptable?, after? (event id), timeout? (30)
                                                                          event
  keys_query       user_id                                                devices, master_keys,
                   self_signing_keys, user_signing_keys, self_signing_key_signed_by_master, failures
  enable_encryption room_id                                               event_id
  trust            user_id? (all users)                                   verified: [[user, device]]
  export_keys      path, passphrase (Megolm session export file)          path
  import_keys      path, passphrase                                       decrypted_late, still_undecryptable
  members          room_id                                                joined, invited, encrypted
  logout, quit     -                                                      -

Events:

  {"event": "room_event", "room_id", "event_id", "sender", "type", "content", "origin_server_ts",
   "decrypted": bool, "state_key"?, "verified"?, "session_id"?}
      every timeline event, decrypted when it was encrypted. A Megolm event that cannot be decrypted
      is reported with "type": "m.room.encrypted", "undecryptable": true, "session_id"; when its key
      arrives later the decrypted form is reported again with "late": true (and replaces it in
      `messages` and `wait_event`).
  {"event": "invite", "room_id", "sender", "is_direct"}
  {"event": "left", "room_id"}
  {"event": "sync_error", "error"}, {"event": "agent_error", "error"}

Trust: room keys are shared with every device of the room's members, verified or not
(nio's ignore_unverified_devices). Before each send to an encrypted room the member list and the
members' device lists are fetched again, so a device that logged in a moment ago gets the room key
of that message (nio alone would wait for /sync to report the device list change).

keys_query also checks signatures: per device "self_signed" (by the device's own key) and
"cross_signed" (by the user's self-signing key), and "self_signing_key_signed_by_master".
A --store directory keeps the Olm account; without it, reusing a device_id of an earlier run fails
at the key upload (the server already has other keys for that device).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from typing import Any
from urllib.parse import quote, urlparse

from nio import (
    AsyncClient,
    AsyncClientConfig,
    ErrorResponse,
    JoinResponse,
    KeysUploadResponse,
    LoginResponse,
    MegolmEvent,
    RoomCreateResponse,
    RoomPreset,
    RoomPutStateResponse,
    RoomSendResponse,
    SyncError,
    UploadResponse,
)
from nio.crypto.attachments import decrypt_attachment
from nio.exceptions import EncryptionError, LocalProtocolError
import vodozemac

MEGOLM = "m.megolm.v1.aes-sha2"
# Big enough that a test never sees a gappy ("limited") timeline between two syncs.
SYNC_FILTER = {"room": {"timeline": {"limit": 100}, "state": {"lazy_load_members": False}}}
log = logging.getLogger("e2ee_client")


class CommandError(Exception):
    """A failed command; the message goes into the reply's "error"."""


def fail_response(what: str, resp: Any) -> CommandError:
    if isinstance(resp, ErrorResponse):
        code = getattr(resp, "status_code", None)
        return CommandError(f"{what}: {code or ''} {resp.message}".strip())
    return CommandError(f"{what}: unexpected response {type(resp).__name__}")


def b64decode_any(text: str) -> bytes:
    text = text.strip()
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if "-" in text or "_" in text else None)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def signature_ok(obj: dict, signer_user: str, key_id: str, public_key: str) -> bool:
    """Whether obj carries a valid ed25519 signature by public_key under signatures[signer_user][key_id]."""
    try:
        sig = obj["signatures"][signer_user][key_id]
        body = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
        vodozemac.Ed25519PublicKey.from_base64(public_key).verify_signature(
            canonical_json(body), vodozemac.Ed25519Signature.from_base64(sig)
        )
        return True
    except Exception:  # missing signature, bad signature, malformed key or base64
        return False


def cross_signing_key(keys: dict | None) -> tuple[str, str] | None:
    """(key_id, public key) of a cross-signing key object (it holds exactly one ed25519 key)."""
    if not keys:
        return None
    for key_id, value in (keys.get("keys") or {}).items():
        if key_id.startswith("ed25519:"):
            return key_id, value
    return None


class Agent:
    def __init__(self, store_dir: str, sync_timeout_ms: int):
        self.store_dir = store_dir
        self.sync_timeout_ms = sync_timeout_ms
        self.client: AsyncClient | None = None
        self.sync_task: asyncio.Task | None = None
        self.changed = asyncio.Condition()
        # room_id -> list of event records (oldest first); event_id -> (room_id, index)
        self.timeline: dict[str, list[dict]] = {}
        self.index: dict[str, tuple[str, int]] = {}
        self.pending: dict[str, MegolmEvent] = {}  # undecryptable, by event id
        self.invites: list[dict] = []  # not yet taken by wait_invite
        self.seen_invites: set[str] = set()
        self.left: set[str] = set()

    # ----- output -------------------------------------------------------------------------

    @staticmethod
    def emit(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_until(self, predicate, timeout: float, what: str):
        """Return predicate()'s first truthy value, waiting for syncs up to timeout seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self.changed:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - loop.time()
                if left <= 0:
                    raise CommandError(f"timed out after {timeout:g} s waiting for {what}")
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except asyncio.TimeoutError:
                    pass

    # ----- sync -----------------------------------------------------------------------------

    def need_client(self) -> AsyncClient:
        if self.client is None or not self.client.logged_in:
            raise CommandError("not logged in")
        return self.client

    def record(self, room_id: str, ev: Any) -> dict:
        src = getattr(ev, "source", None) or {}
        rec: dict[str, Any] = {
            "event": "room_event",
            "room_id": room_id,
            "event_id": src.get("event_id") or getattr(ev, "event_id", None),
            "sender": src.get("sender") or getattr(ev, "sender", None),
            "type": src.get("type"),
            "content": src.get("content", {}),
            "origin_server_ts": src.get("origin_server_ts"),
            "decrypted": bool(getattr(ev, "decrypted", False)),
        }
        if "state_key" in src:
            rec["state_key"] = src["state_key"]
        if isinstance(ev, MegolmEvent):
            rec.update(
                type="m.room.encrypted",
                decrypted=False,
                undecryptable=True,
                session_id=ev.session_id,
                sender_device=ev.device_id,
            )
        elif rec["decrypted"]:
            rec["verified"] = bool(getattr(ev, "verified", False))
            rec["session_id"] = getattr(ev, "session_id", None)
        return rec

    def add_event(self, room_id: str, ev: Any) -> None:
        rec = self.record(room_id, ev)
        eid = rec["event_id"]
        if eid and eid in self.index:
            return  # seen already (a sync overlap)
        events = self.timeline.setdefault(room_id, [])
        if eid:
            self.index[eid] = (room_id, len(events))
        events.append(rec)
        if rec.get("undecryptable") and eid:
            ev.room_id = room_id
            self.pending[eid] = ev
        self.emit(rec)

    def retry_pending(self) -> None:
        """Decrypt events whose room key arrived after them."""
        client = self.client
        if not self.pending or client is None or client.olm is None:
            return
        for eid, ev in list(self.pending.items()):
            try:
                plain = client.decrypt_event(ev)
            except (EncryptionError, LocalProtocolError):
                continue
            except Exception as err:  # a broken payload: keep reporting it undecryptable
                log.debug("late decryption of %s failed: %s", eid, err)
                continue
            if plain is None or isinstance(plain, MegolmEvent):
                continue
            del self.pending[eid]
            room_id, i = self.index[eid]
            rec = self.record(room_id, plain)
            self.timeline[room_id][i] = rec
            self.emit({**rec, "late": True})

    def handle_sync(self, resp: Any) -> None:
        for room_id, info in resp.rooms.invite.items():
            if room_id in self.seen_invites:
                continue
            me = self.client.user_id
            sender, is_direct, space = None, False, False
            for ev in info.invite_state:
                # nio keeps no m.room.create of an invite, so the bridge's personal space (its
                # only space) is known by the name it gives it.
                if (getattr(ev, "name", None) or "").startswith("Interop ("):
                    space = True
                # nio moves the content of stripped member events out of `source`.
                if getattr(ev, "state_key", None) == me and getattr(ev, "membership", None) == "invite":
                    sender = ev.sender
                    is_direct = bool((getattr(ev, "content", None) or {}).get("is_direct"))
            self.seen_invites.add(room_id)
            inv = {"room_id": room_id, "sender": sender, "is_direct": is_direct}
            # Spaces (a login's personal space) are not chats: wait_invite does not take them.
            if not space:
                self.invites.append(inv)
            self.emit({"event": "invite", **inv, "space": space})
        for room_id, info in resp.rooms.join.items():
            self.left.discard(room_id)
            self.seen_invites.discard(room_id)  # a later re-invite is a new invite
            for ev in info.timeline.events:
                self.add_event(room_id, ev)
        for room_id, info in resp.rooms.leave.items():
            for ev in info.timeline.events:
                self.add_event(room_id, ev)
            self.seen_invites.discard(room_id)
            self.invites = [i for i in self.invites if i["room_id"] != room_id]
            if room_id not in self.left:
                self.left.add(room_id)
                self.emit({"event": "left", "room_id": room_id})
        if resp.to_device_events:  # room keys come as to-device events
            self.retry_pending()

    async def housekeeping(self) -> None:
        """What nio's sync_forever does between syncs: to-device messages and key traffic."""
        client = self.client
        steps = [("to-device", client.send_to_device_messages)]
        if client.should_upload_keys:
            steps.append(("keys_upload", client.keys_upload))
        if client.should_query_keys:
            steps.append(("keys_query", client.keys_query))
        if client.should_claim_keys:
            steps.append(("keys_claim", lambda: client.keys_claim(client.get_users_for_key_claiming())))
        for name, step in steps:
            try:
                await step()
            except LocalProtocolError:
                pass  # nothing to do any more (another task did it)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.emit({"event": "agent_error", "error": f"{name}: {err!r}"})

    async def sync_once(self, timeout_ms: int, full_state: bool = False) -> None:
        client = self.client
        resp = await client.sync(timeout=timeout_ms, sync_filter=SYNC_FILTER, full_state=full_state or None)
        if isinstance(resp, SyncError):
            raise CommandError(f"sync: {resp.status_code or ''} {resp.message}".strip())
        self.handle_sync(resp)
        await self.housekeeping()
        await self.notify()

    async def sync_loop(self) -> None:
        while self.client is not None and self.client.logged_in:
            try:
                await self.sync_once(self.sync_timeout_ms)
            except asyncio.CancelledError:
                raise
            except CommandError as err:
                self.emit({"event": "sync_error", "error": str(err)})
                await asyncio.sleep(1)
            except Exception as err:
                self.emit({"event": "sync_error", "error": repr(err)})
                log.debug("sync failed", exc_info=True)
                await asyncio.sleep(1)

    async def stop_sync(self) -> None:
        task, self.sync_task = self.sync_task, None
        if task:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # ----- helpers ----------------------------------------------------------------------------

    async def room_known(self, room_id: str, timeout: float = 15, encrypted: bool | None = None):
        client = self.need_client()

        def ready():
            room = client.rooms.get(room_id)
            if room is None:
                return None
            if encrypted is not None and room.encrypted != encrypted:
                return None
            return room

        what = f"room {room_id} in sync" + ("" if encrypted is None else f" (encrypted={encrypted})")
        return await self.wait_until(ready, timeout, what)

    async def refresh_devices(self, room_id: str) -> None:
        """Fetch the member list and query every member's devices again, so that a member who joined
        or a device that logged in a moment ago (not yet seen through /sync) gets the next room key."""
        client = self.need_client()
        room = client.rooms[room_id]
        resp = await client.joined_members(room_id)
        if isinstance(resp, ErrorResponse):
            raise fail_response("joined_members", resp)
        client.olm.users_for_key_query.update(room.users.keys())
        try:
            resp = await client.keys_query()
        except LocalProtocolError:
            return
        if isinstance(resp, ErrorResponse):
            raise fail_response("keys_query", resp)

    async def send(self, room_id: str, event_type: str, content: dict) -> dict:
        client = self.need_client()
        room = await self.room_known(room_id)
        if room.encrypted:
            await self.refresh_devices(room_id)
        resp = await client.room_send(room_id, event_type, content, ignore_unverified_devices=True)
        if not isinstance(resp, RoomSendResponse):
            raise fail_response("send", resp)
        return {"event_id": resp.event_id, "encrypted": bool(room.encrypted)}

    async def mark_direct(self, room_id: str, other: str) -> None:
        """Add room_id to the m.direct account data under other (what Matrix clients do for DMs)."""
        client = self.need_client()
        path = f"/_matrix/client/v3/user/{quote(client.user_id, safe='')}/account_data/m.direct"
        status, current = await self.http("GET", path)
        direct = current if status == 200 and isinstance(current, dict) else {}
        rooms = direct.setdefault(other, [])
        if room_id not in rooms:
            rooms.append(room_id)
        status, body = await self.http("PUT", path, direct)
        if status != 200:
            raise CommandError(f"m.direct: {status} {body}")

    async def http(self, method: str, path: str, body: Any = None, raw: bool = False):
        """An authenticated request to the homeserver: (status, parsed JSON or bytes)."""
        client = self.need_client()
        headers = {"Authorization": f"Bearer {client.access_token}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body)
        resp = await client.send(method, path, data, headers, timeout=60)
        try:
            payload = await resp.read()
        finally:
            resp.release()
        if raw:
            return resp.status, payload
        try:
            return resp.status, json.loads(payload or b"null")
        except ValueError:
            return resp.status, payload.decode(errors="replace")

    # ----- commands ------------------------------------------------------------------------

    async def cmd_login(self, a: dict) -> dict:
        if self.client is not None and self.client.logged_in:
            raise CommandError(f"already logged in as {self.client.user_id}")
        homeserver = str(a["homeserver"]).rstrip("/")
        config = AsyncClientConfig(
            encryption_enabled=True,
            store_sync_tokens=True,
            max_timeouts=3,
            request_timeout=60,
        )
        client = AsyncClient(homeserver, a["user"], device_id=a.get("device_id") or None,
                             store_path=self.store_dir, config=config)
        self.client = client
        resp = await client.login(a["password"], device_name=a.get("device_name") or "e2ee test client")
        if not isinstance(resp, LoginResponse):
            await client.close()
            self.client = None
            raise fail_response("login", resp)
        # nio uploads keys only from sync_forever; upload them now so that others can share room
        # keys with this device as soon as login returns.
        if client.should_upload_keys:
            up = await client.keys_upload()
            if not isinstance(up, KeysUploadResponse):
                raise fail_response("keys_upload", up)
        await self.sync_once(0, full_state=True)
        self.sync_task = asyncio.create_task(self.sync_loop())
        return {"user_id": client.user_id, "device_id": client.device_id}

    async def cmd_whoami(self, a: dict) -> dict:
        client = self.need_client()
        keys = client.olm.account.identity_keys if client.olm else {}
        return {"user_id": client.user_id, "device_id": client.device_id,
                "access_token": client.access_token, "identity_keys": dict(keys)}

    async def cmd_create_room(self, a: dict) -> dict:
        client = self.need_client()
        invite = list(a.get("invite") or [])
        encrypted = bool(a.get("encrypted", True))
        is_direct = bool(a.get("is_direct", False))
        initial_state = []
        if encrypted:
            initial_state.append({"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}})
        resp = await client.room_create(
            name=a.get("name"),
            topic=a.get("topic"),
            invite=invite,
            is_direct=is_direct,
            preset=RoomPreset.trusted_private_chat if is_direct else RoomPreset.private_chat,
            initial_state=initial_state,
        )
        if not isinstance(resp, RoomCreateResponse):
            raise fail_response("create_room", resp)
        await self.room_known(resp.room_id, encrypted=encrypted)
        if is_direct and len(invite) == 1:
            await self.mark_direct(resp.room_id, invite[0])
        return {"room_id": resp.room_id}

    async def join_room(self, room_id: str) -> str:
        client = self.need_client()
        resp = await client.join(room_id)
        if not isinstance(resp, JoinResponse):
            raise fail_response("join", resp)
        await self.room_known(resp.room_id)
        self.invites = [i for i in self.invites if i["room_id"] != resp.room_id]
        return resp.room_id

    async def cmd_join(self, a: dict) -> dict:
        room_id = await self.join_room(a["room_id"])
        return {"room_id": room_id}

    async def cmd_wait_invite(self, a: dict) -> dict:
        self.need_client()
        inv = await self.wait_until(lambda: self.invites[0] if self.invites else None,
                                    float(a.get("timeout", 30)), "an invite")
        self.invites.remove(inv)
        if a.get("join"):
            await self.join_room(inv["room_id"])
            if inv["is_direct"] and inv["sender"]:
                await self.mark_direct(inv["room_id"], inv["sender"])
        return dict(inv)

    async def cmd_invite(self, a: dict) -> dict:
        resp = await self.need_client().room_invite(a["room_id"], a["user_id"])
        if isinstance(resp, ErrorResponse):
            raise fail_response("invite", resp)
        return {}

    async def cmd_leave(self, a: dict) -> dict:
        resp = await self.need_client().room_leave(a["room_id"])
        if isinstance(resp, ErrorResponse):
            raise fail_response("leave", resp)
        return {}

    async def cmd_send_text(self, a: dict) -> dict:
        content: dict[str, Any] = {"msgtype": a.get("msgtype", "m.text"), "body": a["body"]}
        if a.get("html") is not None:
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = a["html"]
        content.update(a.get("extra") or {})
        return await self.send(a["room_id"], "m.room.message", content)

    async def cmd_send_event(self, a: dict) -> dict:
        return await self.send(a["room_id"], a["type"], dict(a.get("content") or {}))

    async def cmd_send_image(self, a: dict) -> dict:
        client = self.need_client()
        room_id = a["room_id"]
        room = await self.room_known(room_id)
        data = b64decode_any(a["bytes_b64"])
        mimetype = a.get("mimetype") or "application/octet-stream"
        filename = a.get("filename") or "file"
        encrypted = bool(room.encrypted)
        resp, decryption = await client.upload(
            lambda _429, _timeouts: data,
            content_type=mimetype,
            filename=filename,
            encrypt=encrypted,
            filesize=len(data),
        )
        if not isinstance(resp, UploadResponse):
            raise fail_response("upload", resp)
        info = {"mimetype": mimetype, "size": len(data)}
        info.update(a.get("info") or {})
        content: dict[str, Any] = {
            "msgtype": a.get("msgtype", "m.image"),
            "body": a.get("body", filename),
            "info": info,
        }
        if content["body"] != filename:
            content["filename"] = filename
        if encrypted:
            content["file"] = {"url": resp.content_uri, **decryption, "mimetype": mimetype}
        else:
            content["url"] = resp.content_uri
        out = await self.send(room_id, "m.room.message", content)
        return {**out, "content": content}

    async def fetch_media(self, mxc: str) -> tuple[bytes, str]:
        client = self.need_client()
        url = urlparse(mxc)
        if url.scheme != "mxc" or not url.netloc or not url.path.strip("/"):
            raise CommandError(f"not an mxc URI: {mxc!r}")
        resp = await client.download(mxc=mxc)
        body = getattr(resp, "body", None)
        if isinstance(body, (bytes, bytearray)):
            return bytes(body), "nio"
        # nio 0.26 already asks /_matrix/client/v1/media with a bearer token; ask once more by hand so
        # that the error reported is the server's own.
        path = f"/_matrix/client/v1/media/download/{quote(url.netloc, safe='')}/{quote(url.path.strip('/'), safe='')}"
        status, payload = await self.http("GET", path, raw=True)
        if status != 200:
            raise CommandError(f"download {mxc}: nio said {resp}; GET {path}: {status} {payload[:300]!r}")
        return payload, "http"

    async def cmd_download(self, a: dict) -> dict:
        content = a.get("content") or {}
        file = content.get("file")
        mxc = a.get("mxc") or (file or {}).get("url") or content.get("url")
        if not mxc:
            raise CommandError("content has neither file.url nor url")
        data, via = await self.fetch_media(mxc)
        encrypted = bool(file) and not a.get("mxc")
        if encrypted and not a.get("raw"):
            if file.get("v") not in (None, "v2"):
                raise CommandError(f"unsupported encrypted file version {file.get('v')!r}")
            try:
                data = decrypt_attachment(data, file["key"]["k"], file["hashes"]["sha256"], file["iv"])
            except (KeyError, TypeError) as err:
                raise CommandError(f"malformed EncryptedFile: missing {err}")
            except EncryptionError as err:
                raise CommandError(f"attachment decryption failed: {err}")
        return {
            "bytes_b64": base64.b64encode(data).decode(),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "encrypted": encrypted,
            "via": via,
        }

    async def cmd_messages(self, a: dict) -> dict:
        self.need_client()
        return {"events": copy.deepcopy(self.timeline.get(a["room_id"], []))}

    @staticmethod
    def matches(rec: dict, a: dict) -> bool:
        content = rec.get("content") or {}
        for key in ("type", "sender", "event_id", "state_key"):
            if a.get(key) is not None and rec.get(key) != a[key]:
                return False
        if a.get("msgtype") is not None and content.get("msgtype") != a["msgtype"]:
            return False
        if a.get("membership") is not None and content.get("membership") != a["membership"]:
            return False
        if a.get("body_contains") is not None:
            body = content.get("body")
            if not isinstance(body, str) or a["body_contains"] not in body:
                return False
        if a.get("decrypted") is not None and rec.get("decrypted") != bool(a["decrypted"]):
            return False
        if a.get("undecryptable") is not None and bool(rec.get("undecryptable")) != bool(a["undecryptable"]):
            return False
        return True

    async def cmd_wait_event(self, a: dict) -> dict:
        self.need_client()
        rooms = [a["room_id"]] if a.get("room_id") else None
        after = a.get("after")

        def find():
            for room_id in rooms or list(self.timeline):
                events = self.timeline.get(room_id, [])
                start = 0
                if after:
                    if after not in self.index or self.index[after][0] != room_id:
                        if rooms:
                            return None  # the `after` event has not arrived yet
                        continue
                    start = self.index[after][1] + 1
                for rec in events[start:]:
                    if self.matches(rec, a):
                        return rec
            return None

        rec = await self.wait_until(find, float(a.get("timeout", 30)), f"an event matching {self.describe(a)}")
        return {"event": copy.deepcopy(rec)}

    @staticmethod
    def describe(a: dict) -> str:
        keys = ("room_id", "type", "sender", "body_contains", "msgtype", "event_id", "state_key",
                "membership", "decrypted", "undecryptable", "after")
        return json.dumps({k: a[k] for k in keys if a.get(k) is not None})

    async def cmd_keys_query(self, a: dict) -> dict:
        self.need_client()
        user_id = a["user_id"]
        status, body = await self.http("POST", "/_matrix/client/v3/keys/query",
                                       {"device_keys": {user_id: []}, "timeout": 10000})
        if status != 200 or not isinstance(body, dict):
            raise CommandError(f"keys/query: {status} {body}")
        master = (body.get("master_keys") or {}).get(user_id)
        ssk = (body.get("self_signing_keys") or {}).get(user_id)
        usk = (body.get("user_signing_keys") or {}).get(user_id)
        master_key = cross_signing_key(master)
        ssk_key = cross_signing_key(ssk)
        ssk_signed = bool(ssk and master_key and signature_ok(ssk, user_id, *master_key))
        store = self.client.device_store
        devices = {}
        for device_id, keys in ((body.get("device_keys") or {}).get(user_id) or {}).items():
            entry = dict(keys)
            own = signature_ok(keys, user_id, f"ed25519:{device_id}",
                               (keys.get("keys") or {}).get(f"ed25519:{device_id}", ""))
            entry["self_signed"] = own
            entry["cross_signed"] = bool(ssk_key and signature_ok(keys, user_id, *ssk_key))
            try:
                entry["verified"] = bool(store[user_id][device_id].verified)
            except KeyError:
                entry["verified"] = False
            devices[device_id] = entry
        return {
            "user_id": user_id,
            "devices": devices,
            "master_keys": master,
            "self_signing_keys": ssk,
            "user_signing_keys": usk,
            "self_signing_key_signed_by_master": ssk_signed,
            "failures": body.get("failures") or {},
        }

    async def cmd_enable_encryption(self, a: dict) -> dict:
        client = self.need_client()
        room_id = a["room_id"]
        resp = await client.room_put_state(room_id, "m.room.encryption", {"algorithm": MEGOLM})
        if not isinstance(resp, RoomPutStateResponse):
            raise fail_response("enable_encryption", resp)
        await self.room_known(room_id, encrypted=True)
        return {"event_id": resp.event_id}

    async def cmd_trust(self, a: dict) -> dict:
        client = self.need_client()
        if client.should_query_keys:
            try:
                await client.keys_query()
            except LocalProtocolError:
                pass
        done = []
        users = [a["user_id"]] if a.get("user_id") else list(client.device_store.users)
        for user in users:
            for device in client.device_store.active_user_devices(user):
                if client.verify_device(device):
                    done.append([user, device.id])
        return {"verified": done}

    async def cmd_export_keys(self, a: dict) -> dict:
        await self.need_client().export_keys(a["path"], a["passphrase"])
        return {"path": a["path"]}

    async def cmd_import_keys(self, a: dict) -> dict:
        await self.need_client().import_keys(a["path"], a["passphrase"])
        before = len(self.pending)
        self.retry_pending()
        await self.notify()
        return {"decrypted_late": before - len(self.pending), "still_undecryptable": len(self.pending)}

    async def cmd_members(self, a: dict) -> dict:
        room = await self.room_known(a["room_id"])
        joined = sorted(u for u, m in room.users.items() if not m.invited)
        invited = sorted(u for u, m in room.users.items() if m.invited)
        return {"joined": joined, "invited": invited, "encrypted": bool(room.encrypted)}

    async def cmd_logout(self, a: dict) -> dict:
        client = self.need_client()
        await self.stop_sync()
        resp = await client.logout()
        await client.close()
        if isinstance(resp, ErrorResponse):
            raise fail_response("logout", resp)
        return {}

    async def shutdown(self) -> None:
        await self.stop_sync()
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:
                pass


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Lines of stdin on a queue (None at end of input), read by a daemon thread."""
    queue: asyncio.Queue = asyncio.Queue()

    def reader():
        # Raw reads of fd 0, not sys.stdin: a daemon thread blocked inside a buffered reader
        # makes the interpreter abort at exit (it cannot take the buffer's lock).
        pending = b""
        try:
            while True:
                chunk = os.read(0, 1 << 20)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    loop.call_soon_threadsafe(queue.put_nowait, line)
        except OSError:
            pass
        finally:
            try:
                if pending:
                    loop.call_soon_threadsafe(queue.put_nowait, pending)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except RuntimeError:
                pass  # the loop is closed already

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    return queue


async def run(args: argparse.Namespace) -> int:
    store_dir = args.store or tempfile.mkdtemp(prefix="e2ee-client-")
    os.makedirs(store_dir, exist_ok=True)
    agent = Agent(store_dir, args.sync_timeout)
    loop = asyncio.get_running_loop()
    lines = stdin_lines(loop)
    # SIGTERM: stop syncing, close the client and remove the temporary store, even mid-command.
    loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    try:
        while True:
            raw = await lines.get()
            if raw is None:
                break
            raw = raw.strip()
            if not raw:
                continue
            req = None
            try:
                msg = json.loads(raw)
                if not isinstance(msg, dict):
                    raise CommandError("a command must be a JSON object")
                req = msg.get("req")
                name = msg.get("cmd")
                if name == "quit":
                    await agent.shutdown()
                    agent.emit({"ok": True, **({"req": req} if req is not None else {})})
                    return 0
                handler = getattr(agent, f"cmd_{name}", None) if isinstance(name, str) else None
                if handler is None:
                    raise CommandError(f"unknown command {name!r}")
                result = await handler(msg)
                reply = {"ok": True, **result}
            except CommandError as err:
                reply = {"ok": False, "error": str(err)}
            except KeyError as err:
                reply = {"ok": False, "error": f"missing argument {err}"}
            except ValueError as err:
                reply = {"ok": False, "error": f"bad input: {err}"}
            except Exception as err:
                log.debug("command failed", exc_info=True)
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}",
                         "trace": traceback.format_exc(limit=4)}
            if req is not None:
                reply["req"] = req
            agent.emit(reply)
        await agent.shutdown()
        return 0
    except asyncio.CancelledError:
        await agent.shutdown()
        return 143
    finally:
        if not args.store:
            shutil.rmtree(store_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="JSON-lines E2EE Matrix client (matrix-nio) for tests")
    parser.add_argument("--store", help="nio store directory (default: a temporary one, removed at exit)")
    parser.add_argument("--sync-timeout", type=int, default=5000, help="long-poll timeout of /sync in ms")
    parser.add_argument("--verbose", action="store_true", help="nio debug logs on stderr")
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="e2ee_client %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
