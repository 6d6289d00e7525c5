#!/usr/bin/env node
// An end-to-end-encrypted Matrix client on matrix-js-sdk (Rust crypto), driven by JSON lines, for the
// end-to-end tests. It speaks the protocol of e2ee_client.py (same command names and reply shapes),
// and adds what matrix-js-sdk knows on top: the device isolation mode and each event's shield.
//
//   node tests/peers/js_e2ee_client.js [--sync-timeout MS (5000)] [--verbose]
//
// One command per line on stdin, {"cmd": "<name>", ...args}; exactly one reply line per command on
// stdout, {"ok": true, ...result} or {"ok": false, "error": "..."}, with the optional "req" value
// copied into it. Commands run one at a time, in order. Event lines ({"event": ...}) are written at
// any time. Nothing else goes to stdout: matrix-js-sdk's and the crypto library's logs go to stderr
// (warnings and errors only, everything with --verbose). Bytes are base64; timeouts are seconds.
//
// Commands (arguments, then result fields):
//
//   login          homeserver, user, password, device_id?, device_name?,
//                  isolation? ("exclude_insecure" (default) | "all_devices"), cross_sign? (true)
//                                                                       user_id, device_id, isolation,
//                                                                       cross_signed
//   whoami         -                                   user_id, device_id, access_token, identity_keys,
//                                                      isolation
//   set_isolation  isolation                           isolation
//   create_room    invite?, encrypted? (true), is_direct? (false), name?, topic?    room_id
//   join           room_id                                              room_id
//   wait_invite    timeout? (30), join? (false)                         room_id, sender, is_direct
//   invite / leave room_id, user_id / room_id                           -
//   send_text      room_id, body, html?, msgtype? (m.text), extra?      event_id, encrypted
//   send_event     room_id, type, content                               event_id, encrypted
//   send_image     room_id, bytes_b64, mimetype, filename, msgtype? (m.image), info?, body?
//                                                                       event_id, encrypted, content
//   download       content (m.image/m.file content as received) or mxc, raw? (false)
//                                                                       bytes_b64, size, sha256,
//                                                                       encrypted
//   messages       room_id                                              events (oldest first)
//   wait_event     room_id?, type?, sender?, body_contains?, msgtype?, relates_to?, event_id?,
//                  state_key?, membership?, decrypted?, undecryptable?, failure?, after? (event id),
//                  timeout? (30)                                        event
//   shield         event_id                            event (the record, shield computed again now)
//   keys_query     user_id                             user_id, devices, master_keys, self_signing_keys,
//                  user_signing_keys, self_signing_key_signed_by_master, failures
//   members        room_id                                              joined, invited, encrypted
//   logout, quit   -                                                    -
//
// Events:
//
//   {"event": "room_event", "room_id", "event_id", "sender", "type", "content", "origin_server_ts",
//    "decrypted": bool, "state_key"?, "undecryptable"?: true, "failure"?, "session_id"?,
//    "sender_device"?, "shield": {"colour": "NONE"|"GREY"|"RED", "reason": <name>|null} | null}
//       every live timeline event (own sent events included, once the server has given them an id).
//       Encrypted events are reported once their first decryption attempt is over. One that could not
//       be decrypted has "type": "m.room.encrypted", the encrypted content, "undecryptable": true and
//       "failure": matrix-js-sdk's DecryptionFailureCode (e.g. MEGOLM_UNKNOWN_INBOUND_SESSION_ID, or
//       UNSIGNED_SENDER_DEVICE / UNKNOWN_SENDER_DEVICE / SENDER_IDENTITY_PREVIOUSLY_VERIFIED when
//       refused under the isolation mode). When its outcome changes later (the key arrived) it is
//       reported again with "late": true, and the new record replaces the old one in `messages` and
//       `wait_event`. "shield" is CryptoApi.getEncryptionInfoForEvent (shieldColour, shieldReason as
//       EventShieldColour / EventShieldReason names); null where matrix-js-sdk has none (an event sent
//       in the clear, or one that was not decrypted).
//   {"event": "invite", "room_id", "sender", "is_direct"}
//   {"event": "left", "room_id"}
//   {"event": "sync_error", "error"}, {"event": "agent_error", "error"}
//
// Isolation (MSC4153, "exclude insecure devices"): "exclude_insecure" is matrix-js-sdk's
// OnlySignedDevicesIsolationMode: room keys are shared only with devices cross-signed by their owner,
// and events are decrypted only when they come from such devices (the owner's identity need not be
// verified by us). "all_devices" is AllDevicesIsolationMode(false): keys go to every device, every event
// is decrypted, and the shield tells how much it can be trusted.
//
// login bootstraps cross-signing for the user (new keys, uploaded with m.login.password user-interactive
// auth) unless "cross_sign": false, so that the client's own device is cross-signed; it returns once the
// server shows the device (and its cross-signature). The crypto store is in memory: every login is a
// new device.
//
// Before each send to an encrypted room the member list is brought up to date with the server's and
// the device lists of all tracked users are queried again, so that a device that logged in a moment ago
// gets the room key of that message (matrix-js-sdk alone waits for /sync to report the change).
'use strict';

const crypto = require('crypto');
const readline = require('readline');

// ----- output and logging ------------------------------------------------------------------------

const VERBOSE = process.argv.includes('--verbose');
const SYNC_TIMEOUT_MS = (() => {
  const i = process.argv.indexOf('--sync-timeout');
  const v = i >= 0 ? Number(process.argv[i + 1]) : 5000;
  return Number.isFinite(v) && v >= 0 ? v : 5000;
})();

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

// matrix-js-sdk logs through loglevel, which looks the console methods up on every call, and the
// crypto library's tracing calls console too: send all of it to stderr so that stdout stays JSON lines.
{
  const { format } = require('util');
  const toStderr = (level) => (...args) => process.stderr.write(`js_e2ee_client ${level}: ${format(...args)}\n`);
  const quiet = () => {};
  console.log = VERBOSE ? toStderr('log') : quiet;
  console.info = VERBOSE ? toStderr('info') : quiet;
  console.debug = VERBOSE ? toStderr('debug') : quiet;
  console.trace = VERBOSE ? toStderr('trace') : quiet;
  console.warn = toStderr('warn');
  console.error = toStderr('error');
}

class CommandError extends Error {}

const MEGOLM = 'm.megolm.v1.aes-sha2';
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function b64decode(text) {
  const s = String(text).trim().replace(/-/g, '+').replace(/_/g, '/');
  return Buffer.from(s + '='.repeat((4 - (s.length % 4)) % 4), 'base64');
}
const b64 = (buf) => Buffer.from(buf).toString('base64');
const b64unpadded = (buf) => b64(buf).replace(/=+$/, '');
const b64url = (buf) => b64unpadded(buf).replace(/\+/g, '-').replace(/\//g, '_');

function canonicalJson(value) {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value && typeof value === 'object') {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** Whether obj carries a valid ed25519 signature by publicKey (unpadded base64) under signatures[user][keyId]. */
function signatureOk(obj, user, keyId, publicKey) {
  try {
    const sig = obj.signatures[user][keyId];
    const { signatures, unsigned, ...body } = obj;
    const key = crypto.createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: b64url(b64decode(publicKey)) }, format: 'jwk' });
    return crypto.verify(null, Buffer.from(canonicalJson(body)), key, b64decode(sig));
  } catch (_) {
    return false;
  }
}

function crossSigningKey(keys) {
  for (const [keyId, value] of Object.entries((keys && keys.keys) || {})) {
    if (keyId.startsWith('ed25519:')) return [keyId, value];
  }
  return null;
}

function errText(what, err) {
  if (err && err.httpStatus) {
    const code = err.errcode || (err.data && err.data.errcode) || '';
    return `${what}: ${err.httpStatus} ${code} ${err.data && err.data.error ? err.data.error : err.message}`.trim();
  }
  return `${what}: ${err && err.message ? err.message : String(err)}`;
}

// ----- the agent ------------------------------------------------------------------------------------

class Agent {
  constructor(sdk, cryptoApi, wasm) {
    this.sdk = sdk;
    this.C = cryptoApi; // matrix-js-sdk/lib/crypto-api: enums and isolation modes
    this.wasm = wasm;
    this.client = null;
    this.crypto = null;
    this.password = null;
    this.isolation = null;
    this.timeline = new Map(); // room_id -> [record] (oldest first)
    this.index = new Map(); // event_id -> {roomId, i}
    this.matrixEvents = new Map(); // event_id -> MatrixEvent
    this.chains = new Map(); // event_id -> promise chain of its reports
    this.invites = []; // not yet taken by wait_invite
    this.seenInvites = new Set();
    this.left = new Set();
    this.waiters = new Set();
    this.stopping = false;
  }

  // ----- waiting -----------------------------------------------------------------------------

  notify() {
    const waiters = [...this.waiters];
    this.waiters.clear();
    for (const w of waiters) w();
  }

  /** predicate()'s first truthy value, re-evaluated on every change, for up to timeout seconds. */
  async waitUntil(predicate, timeout, what) {
    const deadline = Date.now() + timeout * 1000;
    for (;;) {
      const value = await predicate();
      if (value) return value;
      const left = deadline - Date.now();
      if (left <= 0) throw new CommandError(`timed out after ${timeout} s waiting for ${what}`);
      await new Promise((resolve) => {
        const timer = setTimeout(done, Math.min(left, 500));
        function done() {
          clearTimeout(timer);
          resolve();
        }
        this.waiters.add(done);
      });
    }
  }

  needClient() {
    if (!this.client) throw new CommandError('not logged in');
    return this.client;
  }

  // ----- events --------------------------------------------------------------------------------

  async shieldOf(event) {
    try {
      const info = await this.crypto.getEncryptionInfoForEvent(event);
      if (!info) return null;
      return {
        colour: this.C.EventShieldColour[info.shieldColour] ?? String(info.shieldColour),
        reason: info.shieldReason === null || info.shieldReason === undefined
          ? null : (this.C.EventShieldReason[info.shieldReason] ?? String(info.shieldReason)),
      };
    } catch (err) {
      return { colour: null, reason: null, error: String(err && err.message ? err.message : err) };
    }
  }

  async record(roomId, event) {
    const encrypted = event.isEncrypted();
    const failed = encrypted && event.isDecryptionFailure();
    const decrypted = encrypted && !failed && event.getClearContent() !== null;
    const rec = {
      event: 'room_event',
      room_id: roomId,
      event_id: event.getId(),
      sender: event.getSender(),
      type: failed ? event.getWireType() : event.getType(),
      content: failed ? event.getWireContent() : event.getOriginalContent(),
      origin_server_ts: event.getTs(),
      decrypted,
    };
    if (event.isState()) rec.state_key = event.getStateKey();
    if (encrypted) {
      const wire = event.getWireContent();
      if (wire.session_id) rec.session_id = wire.session_id;
      if (wire.device_id) rec.sender_device = wire.device_id;
    }
    if (failed) {
      rec.undecryptable = true;
      rec.failure = event.decryptionFailureReason;
    }
    rec.shield = decrypted ? await this.shieldOf(event) : null;
    return JSON.parse(JSON.stringify(rec));
  }

  /** Report a live timeline event (once; later changes of its decryption come as "late" reports). */
  track(event, roomId) {
    const id = event.getId();
    if (!id || id.startsWith('~') || this.chains.has(id) || !roomId) return;
    this.matrixEvents.set(id, event);
    const events = this.timeline.get(roomId) || [];
    this.timeline.set(roomId, events);
    this.index.set(id, { roomId, i: events.length });
    events.push(null); // keeps the arrival order while the decryption runs
    const first = (async () => {
      if (event.isEncrypted()) {
        if (event.shouldAttemptDecryption()) this.client.decryptEventIfNeeded(event).catch(() => {});
        const pending = event.getDecryptionPromise();
        if (pending) await pending.catch(() => {});
      }
      const rec = await this.record(roomId, event);
      events[this.index.get(id).i] = rec;
      emit(rec);
      this.notify();
    })().catch((err) => this.agentError(`report ${id}: ${err && err.stack ? err.stack : err}`));
    this.chains.set(id, first);
    if (event.isEncrypted()) {
      event.on(this.sdk.MatrixEventEvent.Decrypted, () => this.redecrypted(id, roomId, event));
    }
  }

  redecrypted(id, roomId, event) {
    const next = this.chains.get(id).then(async () => {
      if (event.isBeingDecrypted()) return; // another Decrypted follows
      const { i } = this.index.get(id);
      const old = this.timeline.get(roomId)[i];
      const rec = await this.record(roomId, event);
      if (old && old.decrypted === rec.decrypted && old.failure === rec.failure) return;
      this.timeline.get(roomId)[i] = rec;
      emit({ ...rec, late: true });
      this.notify();
    }).catch((err) => this.agentError(`late report ${id}: ${err && err.stack ? err.stack : err}`));
    this.chains.set(id, next);
  }

  agentError(error) {
    if (!this.stopping) emit({ event: 'agent_error', error: String(error) });
  }

  inviteInfo(room) {
    const me = room.getMember(this.client.getUserId());
    const ev = me && me.events && me.events.member;
    return {
      room_id: room.roomId,
      sender: ev ? ev.getSender() : null,
      is_direct: Boolean(ev && ev.getContent().is_direct),
    };
  }

  onMyMembership(room, membership) {
    if (membership === 'invite') {
      if (this.seenInvites.has(room.roomId)) return;
      this.seenInvites.add(room.roomId);
      const inv = this.inviteInfo(room);
      // Spaces (a login's personal space) are not chats: wait_invite does not take them.
      const create = room.currentState.getStateEvents('m.room.create', '');
      const space = Boolean(create && create.getContent().type === 'm.space')
        || (typeof room.isSpaceRoom === 'function' && room.isSpaceRoom());
      if (space) return;
      this.invites.push(inv);
      emit({ event: 'invite', ...inv });
    } else if (membership === 'join') {
      this.left.delete(room.roomId);
      this.seenInvites.delete(room.roomId);
    } else if (membership === 'leave' || membership === 'ban') {
      this.seenInvites.delete(room.roomId);
      this.invites = this.invites.filter((i) => i.room_id !== room.roomId);
      if (!this.left.has(room.roomId)) {
        this.left.add(room.roomId);
        emit({ event: 'left', room_id: room.roomId });
      }
    }
    this.notify();
  }

  listen(client) {
    const { RoomEvent, ClientEvent, EventStatus } = this.sdk;
    client.on(RoomEvent.Timeline, (event, room, toStartOfTimeline, removed) => {
      if (toStartOfTimeline || removed || !room) return;
      this.track(event, room.roomId);
      this.notify();
    });
    // Own events: the timeline holds the local echo; report it once it has its real id.
    client.on(RoomEvent.LocalEchoUpdated, (event, room) => {
      if (event.status === EventStatus.SENT || event.status === null) this.track(event, room.roomId);
      this.notify();
    });
    client.on(RoomEvent.MyMembership, (room, membership) => this.onMyMembership(room, membership));
    client.on(ClientEvent.Sync, (state, _prev, data) => {
      if (state === 'ERROR' && !this.stopping) {
        const err = data && data.error;
        emit({ event: 'sync_error', error: err ? errText('sync', err) : 'sync failed' });
      }
      this.notify();
    });
  }

  // ----- helpers -------------------------------------------------------------------------------

  isolationMode(name) {
    if (name === undefined || name === null || name === 'exclude_insecure') {
      return ['exclude_insecure', new this.C.OnlySignedDevicesIsolationMode()];
    }
    if (name === 'all_devices') return ['all_devices', new this.C.AllDevicesIsolationMode(false)];
    throw new CommandError(`unknown isolation ${JSON.stringify(name)} (exclude_insecure or all_devices)`);
  }

  async http(method, path, body, query) {
    try {
      return await this.client.http.authedRequest(method, path, query, body);
    } catch (err) {
      throw new CommandError(errText(`${method} ${path}`, err));
    }
  }

  async roomKnown(roomId, { timeout = 15, encrypted = null, membership = 'join' } = {}) {
    const client = this.needClient();
    const what = `room ${roomId} in sync${encrypted === null ? '' : ` (encrypted=${encrypted})`}`;
    return this.waitUntil(() => {
      const room = client.getRoom(roomId);
      if (!room || (membership && room.getMyMembership() !== membership)) return null;
      if (encrypted !== null && room.hasEncryptionStateEvent() !== encrypted) return null;
      return room;
    }, timeout, what);
  }

  /** The crypto machine's outgoing requests (key queries, uploads), sent now and waited for. */
  async flushOutgoing() {
    const manager = this.crypto.outgoingRequestsManager;
    if (!manager || typeof manager.doProcessOutgoingRequests !== 'function') {
      throw new CommandError('this matrix-js-sdk has no outgoingRequestsManager (the client needs updating)');
    }
    await manager.doProcessOutgoingRequests();
  }

  /** Track these users' devices and query all tracked device lists again, now. */
  async refreshDevices(userIds) {
    const olm = this.crypto.olmMachine;
    if (!olm) throw new CommandError('crypto not ready');
    if (userIds.length) await olm.updateTrackedUsers(userIds.map((u) => new this.wasm.UserId(u)));
    await this.crypto.markAllTrackedUsersAsDirty();
    await this.flushOutgoing();
  }

  /** Wait until the local room state shows every member the server has as joined. */
  async membersCurrent(room) {
    let joined;
    try {
      joined = Object.keys((await this.client.getJoinedRoomMembers(room.roomId)).joined || {});
    } catch (err) {
      throw new CommandError(errText('joined_members', err));
    }
    await this.waitUntil(() => joined.every((u) => {
      const m = room.getMember(u);
      return m && m.membership === 'join';
    }), 15, `the members of ${room.roomId} (${joined.join(', ')}) in sync`);
  }

  async send(roomId, type, content) {
    const client = this.needClient();
    const room = await this.roomKnown(roomId);
    const encrypted = room.hasEncryptionStateEvent();
    if (encrypted) {
      await this.membersCurrent(room);
      const members = await room.getEncryptionTargetMembers();
      await this.refreshDevices(members.map((m) => m.userId));
    }
    let res;
    try {
      res = await client.sendEvent(roomId, type, content);
    } catch (err) {
      throw new CommandError(errText('send', err));
    }
    // What went out (matrix-js-sdk sends some types in the clear even in encrypted rooms: reactions).
    const sent = room.findEventById(res.event_id);
    return { event_id: res.event_id, encrypted: sent ? sent.isEncrypted() : encrypted && type !== 'm.reaction' };
  }

  async markDirect(roomId, other) {
    const client = this.needClient();
    const ev = client.getAccountData('m.direct');
    const direct = JSON.parse(JSON.stringify(ev ? ev.getContent() : {}));
    const rooms = direct[other] || (direct[other] = []);
    if (!rooms.includes(roomId)) rooms.push(roomId);
    try {
      await client.setAccountData('m.direct', direct);
    } catch (err) {
      throw new CommandError(errText('m.direct', err));
    }
  }

  async fetchMedia(mxc) {
    const m = /^mxc:\/\/([^/]+)\/([^/?#]+)$/.exec(String(mxc));
    if (!m) throw new CommandError(`not an mxc URI: ${JSON.stringify(mxc)}`);
    const url = `${this.client.baseUrl}/_matrix/client/v1/media/download/${encodeURIComponent(m[1])}/${encodeURIComponent(m[2])}`;
    const resp = await fetch(url, { headers: { Authorization: `Bearer ${this.client.getAccessToken()}` } });
    const body = Buffer.from(await resp.arrayBuffer());
    if (resp.status !== 200) {
      throw new CommandError(`download ${mxc}: ${resp.status} ${body.subarray(0, 300).toString()}`);
    }
    return body;
  }

  // ----- commands ------------------------------------------------------------------------------

  async cmd_login(a) {
    if (this.client) throw new CommandError(`already logged in as ${this.client.getUserId()}`);
    const [isolationName, isolation] = this.isolationMode(a.isolation);
    const baseUrl = String(a.homeserver).replace(/\/+$/, '');
    const { sdk } = this;
    const anon = sdk.createClient({ baseUrl });
    let login;
    try {
      login = await anon.loginRequest({
        type: 'm.login.password',
        identifier: { type: 'm.id.user', user: a.user },
        password: a.password,
        device_id: a.device_id || undefined,
        initial_device_display_name: a.device_name || 'js e2ee test client',
      });
    } catch (err) {
      throw new CommandError(errText('login', err));
    } finally {
      anon.stopClient();
    }
    const client = sdk.createClient({
      baseUrl,
      userId: login.user_id,
      deviceId: login.device_id,
      accessToken: login.access_token,
    });
    await client.initRustCrypto({ useIndexedDB: false });
    this.client = client;
    this.crypto = client.getCrypto();
    this.password = a.password;
    this.crypto.setDeviceIsolationMode(isolation);
    this.isolation = isolationName;
    this.listen(client);

    const filter = new sdk.Filter(login.user_id);
    filter.setDefinition({ room: { timeline: { limit: 100 }, state: { lazy_load_members: false } } });
    await client.startClient({
      initialSyncLimit: 100,
      filter,
      pollTimeout: SYNC_TIMEOUT_MS,
      lazyLoadMembers: false,
      disablePresence: true,
      pendingEventOrdering: 'chronological',
    });
    await this.waitUntil(() => ['PREPARED', 'SYNCING'].includes(client.getSyncState()), 60, 'the first sync');
    // Device keys go up with the first outgoing requests; send them now.
    await this.flushOutgoing();

    const crossSign = a.cross_sign === undefined ? true : Boolean(a.cross_sign);
    if (crossSign) {
      const user = login.user_id;
      const password = a.password;
      try {
        await this.crypto.bootstrapCrossSigning({
          authUploadDeviceSigningKeys: async (makeRequest) => {
            try {
              return await makeRequest(null);
            } catch (err) {
              if (err.httpStatus !== 401 || !err.data || !err.data.flows) throw err;
              return makeRequest({
                type: 'm.login.password',
                identifier: { type: 'm.id.user', user },
                password,
                session: err.data.session,
              });
            }
          },
        });
      } catch (err) {
        throw new CommandError(errText('bootstrap cross-signing', err));
      }
    }
    // Return once the server shows this device (and, with cross-signing, its cross-signature).
    const me = login.user_id;
    await this.waitUntil(async () => {
      const body = await this.http('POST', '/keys/query', { device_keys: { [me]: [login.device_id] } });
      const dev = ((body.device_keys || {})[me] || {})[login.device_id];
      if (!dev) return false;
      if (!crossSign) return true;
      const ssk = crossSigningKey((body.self_signing_keys || {})[me]);
      return Boolean(ssk && signatureOk(dev, me, ssk[0], ssk[1]));
    }, 30, 'this device on the server' + (crossSign ? ' with its cross-signature' : ''));
    return { user_id: login.user_id, device_id: login.device_id, isolation: isolationName, cross_signed: crossSign };
  }

  async cmd_whoami() {
    const client = this.needClient();
    const keys = await this.crypto.getOwnDeviceKeys();
    return {
      user_id: client.getUserId(),
      device_id: client.getDeviceId(),
      access_token: client.getAccessToken(),
      identity_keys: { ed25519: keys.ed25519, curve25519: keys.curve25519 },
      isolation: this.isolation,
    };
  }

  async cmd_set_isolation(a) {
    this.needClient();
    const [name, mode] = this.isolationMode(a.isolation);
    this.crypto.setDeviceIsolationMode(mode);
    this.isolation = name;
    return { isolation: name };
  }

  async cmd_create_room(a) {
    const client = this.needClient();
    const invite = [...(a.invite || [])];
    const encrypted = a.encrypted === undefined ? true : Boolean(a.encrypted);
    const isDirect = Boolean(a.is_direct);
    const opts = {
      invite,
      is_direct: isDirect,
      preset: isDirect ? 'trusted_private_chat' : 'private_chat',
      initial_state: encrypted ? [{ type: 'm.room.encryption', state_key: '', content: { algorithm: MEGOLM } }] : [],
    };
    if (a.name) opts.name = a.name;
    if (a.topic) opts.topic = a.topic;
    let res;
    try {
      res = await client.createRoom(opts);
    } catch (err) {
      throw new CommandError(errText('create_room', err));
    }
    await this.roomKnown(res.room_id, { encrypted });
    if (isDirect && invite.length === 1) await this.markDirect(res.room_id, invite[0]);
    return { room_id: res.room_id };
  }

  async joinRoom(roomId) {
    const client = this.needClient();
    let room;
    try {
      room = await client.joinRoom(roomId);
    } catch (err) {
      throw new CommandError(errText('join', err));
    }
    await this.roomKnown(room.roomId);
    this.invites = this.invites.filter((i) => i.room_id !== room.roomId);
    return room.roomId;
  }

  async cmd_join(a) {
    return { room_id: await this.joinRoom(a.room_id) };
  }

  async cmd_wait_invite(a) {
    this.needClient();
    const inv = await this.waitUntil(() => this.invites[0], Number(a.timeout ?? 30), 'an invite');
    this.invites = this.invites.filter((i) => i !== inv);
    const room = this.client.getRoom(inv.room_id);
    if (room && !inv.sender) Object.assign(inv, this.inviteInfo(room));
    if (a.join) {
      await this.joinRoom(inv.room_id);
      if (inv.is_direct && inv.sender) await this.markDirect(inv.room_id, inv.sender);
    }
    return { ...inv };
  }

  async cmd_invite(a) {
    try {
      await this.needClient().invite(a.room_id, a.user_id);
    } catch (err) {
      throw new CommandError(errText('invite', err));
    }
    return {};
  }

  async cmd_leave(a) {
    try {
      await this.needClient().leave(a.room_id);
    } catch (err) {
      throw new CommandError(errText('leave', err));
    }
    return {};
  }

  async cmd_send_text(a) {
    if (typeof a.body !== 'string') throw new CommandError('missing argument body');
    const content = { msgtype: a.msgtype || 'm.text', body: a.body };
    if (a.html !== undefined && a.html !== null) {
      content.format = 'org.matrix.custom.html';
      content.formatted_body = a.html;
    }
    Object.assign(content, a.extra || {});
    return this.send(a.room_id, 'm.room.message', content);
  }

  async cmd_send_event(a) {
    if (!a.type) throw new CommandError('missing argument type');
    return this.send(a.room_id, a.type, { ...(a.content || {}) });
  }

  async cmd_send_image(a) {
    const client = this.needClient();
    const room = await this.roomKnown(a.room_id);
    const data = b64decode(a.bytes_b64 || '');
    const mimetype = a.mimetype || 'application/octet-stream';
    const filename = a.filename || 'file';
    const encrypted = room.hasEncryptionStateEvent();
    let upload = data;
    let file = null;
    if (encrypted) {
      // Encrypted attachment (spec: "Sending encrypted attachments"): AES-256-CTR, 64-bit counter
      // starting at zero, random 64-bit IV prefix, SHA-256 of the ciphertext.
      const key = crypto.randomBytes(32);
      const iv = Buffer.concat([crypto.randomBytes(8), Buffer.alloc(8)]);
      const cipher = crypto.createCipheriv('aes-256-ctr', key, iv);
      upload = Buffer.concat([cipher.update(data), cipher.final()]);
      file = {
        v: 'v2',
        key: { kty: 'oct', key_ops: ['encrypt', 'decrypt'], alg: 'A256CTR', k: b64url(key), ext: true },
        iv: b64unpadded(iv),
        hashes: { sha256: b64unpadded(crypto.createHash('sha256').update(upload).digest()) },
      };
    }
    const url = `${client.baseUrl}/_matrix/media/v3/upload?filename=${encodeURIComponent(filename)}`;
    const resp = await fetch(url, {
      method: 'POST',
      headers: {
        Authorization: `Bearer ${client.getAccessToken()}`,
        'Content-Type': encrypted ? 'application/octet-stream' : mimetype,
      },
      body: upload,
    });
    const body = await resp.json().catch(() => ({}));
    if (resp.status !== 200 || !body.content_uri) throw new CommandError(`upload: ${resp.status} ${JSON.stringify(body)}`);
    const content = {
      msgtype: a.msgtype || 'm.image',
      body: a.body ?? filename,
      info: { mimetype, size: data.length, ...(a.info || {}) },
    };
    if (content.body !== filename) content.filename = filename;
    if (encrypted) content.file = { url: body.content_uri, ...file, mimetype };
    else content.url = body.content_uri;
    const out = await this.send(a.room_id, 'm.room.message', content);
    return { ...out, content };
  }

  async cmd_download(a) {
    this.needClient();
    const content = a.content || {};
    const file = content.file;
    const mxc = a.mxc || (file && file.url) || content.url;
    if (!mxc) throw new CommandError('content has neither file.url nor url');
    let data = await this.fetchMedia(mxc);
    const encrypted = Boolean(file) && !a.mxc;
    if (encrypted && !a.raw) {
      if (file.v !== undefined && file.v !== 'v2') throw new CommandError(`unsupported encrypted file version ${JSON.stringify(file.v)}`);
      if (!file.key || !file.key.k || !file.iv || !file.hashes || !file.hashes.sha256) {
        throw new CommandError('malformed EncryptedFile: needs key.k, iv and hashes.sha256');
      }
      const { subtle } = globalThis.crypto;
      const digest = Buffer.from(await subtle.digest('SHA-256', data));
      if (!digest.equals(b64decode(file.hashes.sha256))) throw new CommandError('attachment decryption failed: SHA-256 mismatch');
      const iv = b64decode(file.iv);
      if (iv.length !== 16) throw new CommandError(`attachment decryption failed: iv of ${iv.length} bytes`);
      let key;
      try {
        key = await subtle.importKey('jwk', { kty: 'oct', k: file.key.k, alg: 'A256CTR', ext: true, key_ops: ['encrypt', 'decrypt'] },
          { name: 'AES-CTR' }, false, ['decrypt']);
      } catch (err) {
        throw new CommandError(`attachment decryption failed: bad key: ${err.message}`);
      }
      data = Buffer.from(await subtle.decrypt({ name: 'AES-CTR', counter: iv, length: 64 }, key, data));
    }
    return {
      bytes_b64: b64(data),
      size: data.length,
      sha256: crypto.createHash('sha256').update(data).digest('hex'),
      encrypted,
    };
  }

  async cmd_messages(a) {
    this.needClient();
    return { events: (this.timeline.get(a.room_id) || []).filter(Boolean) };
  }

  static relatesTo(content) {
    const rel = content && content['m.relates_to'];
    if (!rel || typeof rel !== 'object') return [];
    const ids = [];
    if (rel.event_id) ids.push(rel.event_id);
    if (rel['m.in_reply_to'] && rel['m.in_reply_to'].event_id) ids.push(rel['m.in_reply_to'].event_id);
    return ids;
  }

  static matches(rec, a) {
    const content = rec.content || {};
    for (const key of ['type', 'sender', 'event_id', 'state_key', 'failure']) {
      if (a[key] !== undefined && a[key] !== null && rec[key] !== a[key]) return false;
    }
    if (a.msgtype != null && content.msgtype !== a.msgtype) return false;
    if (a.membership != null && content.membership !== a.membership) return false;
    if (a.body_contains != null && (typeof content.body !== 'string' || !content.body.includes(a.body_contains))) return false;
    if (a.relates_to != null && !Agent.relatesTo(content).includes(a.relates_to)) return false;
    if (a.decrypted != null && rec.decrypted !== Boolean(a.decrypted)) return false;
    if (a.undecryptable != null && Boolean(rec.undecryptable) !== Boolean(a.undecryptable)) return false;
    return true;
  }

  async cmd_wait_event(a) {
    this.needClient();
    const rooms = a.room_id ? [a.room_id] : null;
    const find = () => {
      for (const roomId of rooms || [...this.timeline.keys()]) {
        const events = this.timeline.get(roomId) || [];
        let start = 0;
        if (a.after) {
          const at = this.index.get(a.after);
          if (!at || at.roomId !== roomId) {
            if (rooms) return null; // the `after` event has not arrived yet
            continue;
          }
          start = at.i + 1;
        }
        for (const rec of events.slice(start)) if (rec && Agent.matches(rec, a)) return rec;
      }
      return null;
    };
    const keys = ['room_id', 'type', 'sender', 'body_contains', 'msgtype', 'relates_to', 'event_id', 'state_key',
      'membership', 'decrypted', 'undecryptable', 'failure', 'after'];
    const what = `an event matching ${JSON.stringify(Object.fromEntries(keys.filter((k) => a[k] != null).map((k) => [k, a[k]])))}`;
    const rec = await this.waitUntil(find, Number(a.timeout ?? 30), what);
    return { event: rec };
  }

  async cmd_shield(a) {
    this.needClient();
    const event = this.matrixEvents.get(a.event_id);
    const at = this.index.get(a.event_id);
    if (!event || !at) throw new CommandError(`unknown event ${a.event_id}`);
    await this.chains.get(a.event_id);
    return { event: await this.record(at.roomId, event) };
  }

  async cmd_keys_query(a) {
    this.needClient();
    const user = a.user_id;
    if (!user) throw new CommandError('missing argument user_id');
    const body = await this.http('POST', '/keys/query', { device_keys: { [user]: [] }, timeout: 10000 });
    // Bring the crypto machine's view of this user up to date before asking it about the devices.
    await this.refreshDevices([user]);
    const master = (body.master_keys || {})[user] || null;
    const ssk = (body.self_signing_keys || {})[user] || null;
    const usk = (body.user_signing_keys || {})[user] || null;
    const masterKey = crossSigningKey(master);
    const sskKey = crossSigningKey(ssk);
    const devices = {};
    for (const [deviceId, keys] of Object.entries((body.device_keys || {})[user] || {})) {
      const status = await this.crypto.getDeviceVerificationStatus(user, deviceId);
      devices[deviceId] = {
        ...keys,
        // matrix-js-sdk's view (DeviceVerificationStatus)
        cross_signed: Boolean(status && status.signedByOwner),
        cross_signing_verified: Boolean(status && status.crossSigningVerified),
        locally_verified: Boolean(status && status.localVerified),
        verified: Boolean(status && status.isVerified()),
        known_to_crypto: Boolean(status),
        // the signatures on the server's copy, checked here
        self_signed: signatureOk(keys, user, `ed25519:${deviceId}`, (keys.keys || {})[`ed25519:${deviceId}`] || ''),
        signed_by_self_signing_key: Boolean(sskKey && signatureOk(keys, user, sskKey[0], sskKey[1])),
      };
    }
    let identity = null;
    try {
      const v = await this.crypto.getUserVerificationStatus(user);
      identity = { cross_signing_verified: v.isCrossSigningVerified(), verified: v.isVerified(),
        was_verified: v.wasCrossSigningVerified() };
    } catch (_) {
      identity = null;
    }
    return {
      user_id: user,
      devices,
      master_keys: master,
      self_signing_keys: ssk,
      user_signing_keys: usk,
      self_signing_key_signed_by_master: Boolean(ssk && masterKey && signatureOk(ssk, user, masterKey[0], masterKey[1])),
      identity,
      failures: body.failures || {},
    };
  }

  async cmd_members(a) {
    const room = await this.roomKnown(a.room_id);
    const ids = (m) => room.getMembersWithMembership(m).map((x) => x.userId).sort();
    return { joined: ids('join'), invited: ids('invite'), encrypted: room.hasEncryptionStateEvent() };
  }

  async cmd_logout() {
    const client = this.needClient();
    this.stopping = true;
    try {
      await client.logout(true);
    } catch (err) {
      throw new CommandError(errText('logout', err));
    } finally {
      this.shutdown();
    }
    return {};
  }

  shutdown() {
    this.stopping = true;
    const client = this.client;
    this.client = null;
    if (client) {
      try {
        client.stopClient();
      } catch (_) {
        // already stopped
      }
    }
  }
}

// ----- the JSON-lines loop -----------------------------------------------------------------------------

async function main() {
  const sdk = await import('matrix-js-sdk');
  const cryptoApi = await import('matrix-js-sdk/lib/crypto-api/index.js');
  const wasm = await import('@matrix-org/matrix-sdk-crypto-wasm');
  const agent = new Agent(sdk, cryptoApi, wasm);

  process.on('unhandledRejection', (err) => agent.agentError(`unhandled rejection: ${err && err.stack ? err.stack : err}`));

  const finish = (code) => {
    agent.shutdown();
    // stdout is a pipe or a file: writes are synchronous, nothing is left to flush.
    process.exit(code);
  };
  process.on('SIGTERM', () => finish(143));

  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  let chain = Promise.resolve();
  rl.on('line', (line) => {
    if (!line.trim()) return;
    chain = chain.then(async () => {
      let req;
      let reply;
      try {
        let msg;
        try {
          msg = JSON.parse(line);
        } catch (err) {
          throw new CommandError(`bad input: ${err.message}`);
        }
        if (!msg || typeof msg !== 'object' || Array.isArray(msg)) throw new CommandError('a command must be a JSON object');
        req = msg.req;
        const name = msg.cmd;
        if (name === 'quit') {
          emit({ ok: true, ...(req !== undefined ? { req } : {}) });
          finish(0);
          return;
        }
        const handler = typeof name === 'string' && /^[a-z_]+$/.test(name) ? agent[`cmd_${name}`] : undefined;
        if (typeof handler !== 'function') throw new CommandError(`unknown command ${JSON.stringify(name)}`);
        reply = { ok: true, ...(await handler.call(agent, msg)) };
      } catch (err) {
        reply = err instanceof CommandError
          ? { ok: false, error: err.message }
          : { ok: false, error: `${err && err.name ? err.name : 'Error'}: ${err && err.message ? err.message : err}`,
            trace: err && err.stack ? String(err.stack).split('\n').slice(0, 5).join('\n') : undefined };
      }
      if (req !== undefined) reply.req = req;
      emit(reply);
    });
  });
  rl.on('close', () => {
    chain.then(() => finish(0));
  });
}

main().catch((err) => {
  process.stderr.write(`js_e2ee_client: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
