// A test contact on the interop network: one account, official libsignal for the end-to-end layer
// (the current one, or 0.72.1 with MIB_CONTACT_LIBSIGNAL=x3dh: see libsignal.js), the gateway
// protocol of docs/interop-protocol.md underneath. Commands are methods of `Contact`
// (named as the JSON-lines commands); incoming things are reported through `emit(event)`.
'use strict';

const crypto = require('crypto');
const { GatewayClient, GatewayError } = require('./gateway-client');
const { addressOf, SignalState, Mutex } = require('./signal-stores');
const L = require('./libsignal');
const { protobuf } = require('./proto');
const content = require('./content');

const CHUNK = 512 * 1024;
const b64 = (u) => Buffer.from(u).toString('base64');
const unb64 = (s) => Buffer.from(s, 'base64');
const REMEMBERED_ENVELOPES = 10000;

const { S, LIBSIGNAL } = L;

// libsignal's wire format: a version byte (message version in the high nibble), then protobuf; a
// SignalMessage ends with an 8-byte MAC. Fields read here: PreKeySignalMessage 4 = the inner
// SignalMessage, 8 = the Kyber ciphertext (absent in X3DH); SignalMessage 5 = the SPQR (post-quantum
// ratchet) data (absent before SPQR, so always in version 3 and in anything 0.72.1 sends).
const MAC_LENGTH = 8;

/** The length-delimited fields of a protobuf message, by field number. */
function bytesFields(buf) {
  const out = new Map();
  const r = protobuf.Reader.create(buf);
  while (r.pos < r.len) {
    const tag = r.uint32();
    if ((tag & 7) === 2) out.set(tag >>> 3, r.bytes());
    else r.skipType(tag & 7);
  }
  return out;
}

const pqRatchetLength = (signalMessage) => (bytesFields(signalMessage.subarray(1, signalMessage.length - MAC_LENGTH)).get(5) || []).length;

/**
 * Reads the version, SPQR and Kyber facts that a ciphertext shows (libsignal exposes no session
 * getters for them). Read from the wire, so that it is the same for both libraries and for version 3
 * (X3DH: no Kyber ciphertext, no SPQR) and version 4 (PQXDH) messages.
 */
function describeCiphertext(type, ciphertext) {
  const bytes = Buffer.from(ciphertext);
  if (bytes.length < 1 + MAC_LENGTH) throw new Error('ciphertext too short');
  const version = bytes[0] >> 4;
  if (type === S.CiphertextMessageType.PreKey) {
    const fields = bytesFields(bytes.subarray(1));
    const inner = fields.get(4);
    const kyberCiphertext = (fields.get(8) || []).length;
    const pq = inner ? pqRatchetLength(Buffer.from(inner)) : 0;
    return { kind: 'PREKEY', message_version: version, pqxdh: kyberCiphertext > 0, kyber_ciphertext_bytes: kyberCiphertext, pq_ratchet_bytes: pq, spqr: pq > 0 };
  }
  if (type === S.CiphertextMessageType.Whisper) {
    const pq = pqRatchetLength(bytes);
    return { kind: 'MESSAGE', message_version: version, pq_ratchet_bytes: pq, spqr: pq > 0 };
  }
  throw new Error(`unexpected ciphertext type ${type}`);
}

function groupJson(g) {
  return g && { id: g.id, name: g.name, avatar_blob: g.avatar_blob, members: [...g.members], changed_by: g.changed_by, revision: g.revision };
}

class Contact {
  /**
   * @param {object} opts {emit(event), state?: SignalState JSON, account?, secret?}
   */
  constructor({ emit = () => {}, saved } = {}) {
    this.emit = emit;
    this.client = null;
    this.endpoint = null; // {host, port, server_key}
    this.account = null;
    this.secret = null;
    this.signal = null;
    this.loggedIn = false;
    this.autoReceipts = true;
    this.holdAcks = false;
    this.heldAcks = new Set();
    this.autoReplenish = 0; // when > 0: on PrekeysLow, upload this many of each kind
    this.lastUpload = { one_time: 20, kyber: 20 };
    this.kyber = true; // false: key uploads carry no Kyber keys (an X3DH-era client, x3dh library only)
    this.groups = new Map(); // group id -> Group
    this.senderKeyState = new Map(); // group id -> {distributionId, sentTo: Set}
    this.seen = new Map(); // envelope id -> event emitted for it (redelivery)
    this.lock = new Mutex(); // Signal store operations
    this.inbox = Promise.resolve(); // incoming envelopes, one at a time
    this.expectedClose = false;
    if (saved) this._load(saved);
  }

  // ------------------------------------------------------------ connection and account

  async connect({ host = '127.0.0.1', port, server_key }) {
    if (!port || !server_key) throw new Error('connect needs port and server_key');
    if (this.client && this.client.connected) throw new Error('already connected');
    const client = new GatewayClient();
    await client.connect({ host, port: Number(port), serverKey: server_key });
    this.client = client;
    this.endpoint = { host, port: Number(port), server_key };
    this.loggedIn = false;
    this.expectedClose = false;
    client.on('push', (name, value) => this._onPush(name, value));
    client.on('close', ({ reason }) => {
      this.loggedIn = false;
      if (this.client === client) this.client = null;
      this.emit({ event: 'disconnected', reason, expected: this.expectedClose });
    });
    return { server_key, host, port: Number(port) };
  }

  async disconnect() {
    if (!this.client) return { was_connected: false };
    this.expectedClose = true;
    const c = this.client;
    await new Promise((resolve) => {
      c.once('close', resolve);
      c.close('disconnect command');
    });
    return { was_connected: true };
  }

  /** Register + Verify (if `code` is given). Keeps the secret. Creates the Signal identity once. */
  async register({ account, code }) {
    this._need({ connected: true });
    if (!account) throw new Error('register needs account');
    await this._req('register', { account });
    if (this.account !== account) {
      this.account = account;
      this.signal = null;
      this.groups.clear();
      this.senderKeyState.clear();
      this.seen.clear();
    }
    if (!this.signal) this.signal = this._newSignalState(account);
    if (code === undefined || code === null) return { account, verified: false };
    return this.verify({ account, code });
  }

  async verify({ account = this.account, code }) {
    this._need({ connected: true });
    const { value } = await this._req('verify', { account, code: String(code) });
    this.account = value.account;
    this.secret = Buffer.from(value.secret);
    if (!this.signal) this.signal = this._newSignalState(this.account);
    return { account: value.account, secret: b64(value.secret), verified: true };
  }

  async login({ account, secret } = {}) {
    this._need({ connected: true });
    if (account) {
      if (account !== this.account) {
        this.account = account;
        this.signal = this._newSignalState(account);
      }
    }
    if (secret) this.secret = unb64(secret);
    if (!this.account || !this.secret) throw new Error('login needs a registered account (run register first)');
    const { value } = await this._req('login', { account: this.account, secret: this.secret });
    this.loggedIn = true;
    return { account: value.account, queued: value.queued, one_time_prekeys: value.one_time_prekeys, kyber_prekeys: value.kyber_prekeys };
  }

  async upload_keys({ one_time = 20, kyber = 20 } = {}) {
    this._need({ loggedIn: true });
    this.lastUpload = { one_time, kyber };
    const body = await this.lock.run(async () => this.signal.generateUpload({ oneTime: one_time, kyber, withKyber: this.kyber }));
    const { value } = await this._req('upload_keys', body);
    return { identity_key: b64(this.signal.identityKey), registration_id: this.signal.registrationId, one_time_prekeys: value.one_time_prekeys, kyber_prekeys: value.kyber_prekeys };
  }

  async key_counts() {
    this._need({ loggedIn: true });
    const { value } = await this._req('key_counts', {});
    return { one_time_prekeys: value.one_time_prekeys, kyber_prekeys: value.kyber_prekeys };
  }

  /** New identity key (as after a reinstall): drops sessions and sender keys, uploads fresh keys. */
  async reset_identity({ one_time, kyber } = {}) {
    this._need({ loggedIn: true });
    const old = b64(this.signal.identityKey);
    await this.lock.run(async () => this.signal.resetIdentity());
    this.senderKeyState.clear();
    const up = await this.upload_keys({ one_time: one_time ?? this.lastUpload.one_time, kyber: kyber ?? this.lastUpload.kyber });
    return { old_identity_key: old, ...up };
  }

  /**
   * The Kyber switch. Off (x3dh library only): every later key upload (upload_keys, reset_identity,
   * replenishing) has no Kyber last-resort and no one-time Kyber prekeys, as an X3DH-era client's
   * (keys uploaded before stay in the directory), and sessions it starts are X3DH even when the
   * peer's bundle has a Kyber prekey. On again, when it was off (the peer upgrades): a
   * new signed prekey, a Kyber last-resort prekey and `kyber` one-time Kyber prekeys are uploaded now.
   */
  async set_kyber({ enabled, kyber = 20 } = {}) {
    if (typeof enabled !== 'boolean') throw new Error('set_kyber needs "enabled": true or false');
    if (!enabled) {
      if (!LIBSIGNAL.x3dh) {
        throw new Error(`set_kyber enabled=false needs ${L.ENV}=x3dh: ${LIBSIGNAL.package} ${LIBSIGNAL.version} cannot do X3DH, only PQXDH`);
      }
      this.kyber = false;
      return { kyber: false, uploaded: false };
    }
    if (this.kyber) return { kyber: true, uploaded: false };
    const n = Number(kyber);
    if (!Number.isInteger(n) || n < 0) throw new Error('set_kyber: "kyber" must be a count (0 or more)');
    try {
      this._need({ loggedIn: true });
    } catch (e) {
      throw new Error(`set_kyber enabled=true uploads Kyber keys at once: ${e.message}`);
    }
    const body = await this.lock.run(async () => this.signal.generateUpload({ oneTime: 0, kyber: n, withKyber: true }));
    const { value } = await this._req('upload_keys', body);
    this.kyber = true;
    return { kyber: true, uploaded: true, one_time_prekeys: value.one_time_prekeys, kyber_prekeys: value.kyber_prekeys };
  }

  async ping({ nonce = Date.now() } = {}) {
    this._need({ connected: true });
    const { value } = await this._req('ping', { nonce });
    return { nonce: value.nonce };
  }

  status() {
    return {
      account: this.account,
      connected: !!(this.client && this.client.connected),
      logged_in: this.loggedIn,
      identity_key: this.signal ? b64(this.signal.identityKey) : null,
      hold_acks: this.holdAcks,
      held_acks: this.heldAcks.size,
      auto_receipts: this.autoReceipts,
      libsignal_version: LIBSIGNAL.version,
      kyber: this.kyber,
    };
  }

  // ------------------------------------------------------------ messages

  /** Sends a DataMessage (JSON form) to one account; starts a session when needed (PQXDH, or X3DH when the peer has no Kyber prekey). */
  async send({ to, content: json, message_id = crypto.randomUUID(), timestamp = Date.now() }) {
    this._need({ loggedIn: true });
    if (!to) throw new Error('send needs to');
    const plaintext = content.encodeDataContent(json);
    return this._sendPairwise(to, plaintext, { message_id, timestamp });
  }

  async receipt({ to, type = 'DELIVERED', message_ids, group = '' }) {
    this._need({ loggedIn: true });
    const ids = Array.isArray(message_ids) ? message_ids : [message_ids];
    await this._req('send_receipt', { to, receipt: { type, message_ids: ids, group } });
    return {};
  }

  async typing({ to = '', group = '', typing = true }) {
    this._need({ loggedIn: true });
    await this._req('send_typing', { to, group, typing: !!typing });
    return {};
  }

  async presence({ online = true }) {
    this._need({ loggedIn: true });
    await this._req('set_presence', { online: !!online });
    return {};
  }

  async set_profile({ name = '', avatar_blob = '' }) {
    this._need({ loggedIn: true });
    await this._req('set_profile', { name, avatar_blob });
    return {};
  }

  async get_profile({ account }) {
    this._need({ loggedIn: true });
    const { value } = await this._req('get_profile', { account });
    return { profile: { account: value.account, name: value.name, avatar_blob: value.avatar_blob } };
  }

  // ------------------------------------------------------------ groups

  async create_group({ name = '', members = [] }) {
    this._need({ loggedIn: true });
    const { value } = await this._req('create_group', { name, members });
    this.groups.set(value.id, value);
    return { group: groupJson(value) };
  }

  async update_group({ group, add = [], remove = [], name, avatar_blob }) {
    this._need({ loggedIn: true });
    const body = { group, add, remove };
    if (name !== undefined) body.name = name;
    if (avatar_blob !== undefined) body.avatar_blob = avatar_blob;
    const { value } = await this._req('update_group', body);
    this._groupChanged(value);
    return { group: groupJson(value) };
  }

  async get_group({ group }) {
    this._need({ loggedIn: true });
    const { value } = await this._req('get_group', { group });
    this._groupChanged(value);
    return { group: groupJson(value) };
  }

  /**
   * Sends a DataMessage to a group with sender keys (§16): our sender key goes pairwise to every
   * member that does not have the current one yet, then one GROUP ciphertext is fanned out.
   */
  async send_group({ group, content: json, message_id = crypto.randomUUID(), timestamp = Date.now() }) {
    this._need({ loggedIn: true });
    const plaintext = content.encodeDataContent(json);
    const { value: g } = await this._req('get_group', { group });
    this._groupChanged(g);
    const others = g.members.filter((m) => m !== this.account);
    const st = this._senderKeyFor(group);
    const distributedTo = [];
    const missing = others.filter((m) => !st.sentTo.has(m));
    if (missing.length) {
      const skdm = await this.lock.run(() => S.SenderKeyDistributionMessage.create(this.signal.address, st.distributionId, this.signal.senderKeys));
      const skContent = content.encodeSenderKeyContent(group, skdm.serialize());
      for (const m of missing) {
        await this._sendPairwise(m, skContent, { message_id: crypto.randomUUID(), timestamp: Date.now() });
        st.sentTo.add(m);
        distributedTo.push(m);
      }
    }
    const ct = await this.lock.run(() => S.groupEncrypt(this.signal.address, st.distributionId, this.signal.senderKeys, plaintext));
    const { value: sent } = await this._req('send', { group, kind: 'GROUP', ciphertext: Buffer.from(ct.serialize()), message_id, timestamp });
    return { message_id: sent.message_id, server_timestamp: sent.server_timestamp, recipients: sent.recipients, distribution_id: st.distributionId, distributed_to: distributedTo };
  }

  // ------------------------------------------------------------ media

  /** Encrypts and uploads a file; returns a `media` object ready to put into a DataMessage. */
  async upload_media({ bytes_b64, mimetype = 'application/octet-stream', filename = '', type, raw = false, ...meta }) {
    this._need({ loggedIn: true });
    const plaintext = unb64(bytes_b64 || '');
    if (raw) {
      const stored = await this._uploadBlob(plaintext);
      return { blob: stored.blob, size: stored.size };
    }
    const enc = content.encryptMedia(plaintext);
    const stored = await this._uploadBlob(enc.blob);
    const media = {
      type: type || content.mediaTypeFor(mimetype),
      blob: stored.blob,
      key: b64(enc.key),
      sha256: b64(enc.sha256),
      size: enc.size,
      mimetype,
      filename,
      ...meta,
    };
    return { media, blob: stored.blob, blob_size: stored.size };
  }

  /** Downloads a blob and, unless `raw`, checks its SHA-256 and HMAC and decrypts it. */
  async download_media({ media, blob, raw = false }) {
    this._need({ loggedIn: true });
    const id = blob || (media && media.blob);
    if (!id) throw new Error('download_media needs media (or blob)');
    const bytes = await this._downloadBlob(id);
    if (raw || !media) return { bytes_b64: b64(bytes), size: bytes.length };
    const plaintext = content.decryptMedia(bytes, {
      key: typeof media.key === 'string' ? unb64(media.key) : media.key,
      sha256: typeof media.sha256 === 'string' ? unb64(media.sha256) : media.sha256,
      size: media.size,
    });
    return { bytes_b64: b64(plaintext), size: plaintext.length, mimetype: media.mimetype || '' };
  }

  // ------------------------------------------------------------ switches

  hold_acks({ on = true } = {}) {
    this.holdAcks = !!on;
    const held = this.heldAcks.size;
    if (!this.holdAcks && held) {
      const ids = [...this.heldAcks];
      this.heldAcks.clear();
      if (this.loggedIn) this._req('ack', { envelope_ids: ids }).catch(() => {});
    }
    return { hold_acks: this.holdAcks, held };
  }

  auto_receipts({ on = true } = {}) {
    this.autoReceipts = !!on;
    return { auto_receipts: this.autoReceipts };
  }

  auto_replenish({ count = 50 } = {}) {
    this.autoReplenish = Number(count) || 0;
    return { auto_replenish: this.autoReplenish };
  }

  /** Waits until every envelope received so far has been processed. */
  async drain() {
    await this.inbox;
    return {};
  }

  /** The Signal state as JSON (account, secret, keys, sessions) to resume later. */
  save() {
    return {
      account: this.account,
      secret: this.secret ? b64(this.secret) : null,
      signal: this.signal ? this.signal.toJSON() : null,
      lastUpload: this.lastUpload,
      kyber: this.kyber,
    };
  }

  // ------------------------------------------------------------ internals

  _need({ connected, loggedIn }) {
    if ((connected || loggedIn) && !(this.client && this.client.connected)) throw new Error('not connected');
    if (loggedIn && !this.loggedIn) throw new Error('not logged in');
    if (loggedIn && !this.signal) throw new Error('no Signal state (register first)');
  }

  _req(name, body, opts) {
    if (!this.client) return Promise.reject(new Error('not connected'));
    return this.client.request(name, body, opts);
  }

  _newSignalState(account) {
    return new SignalState(account, {
      onIdentityChange: (who, oldKey, newKey) =>
        this.emit({ event: 'identity_change', account: who, old_identity_key: b64(oldKey), new_identity_key: b64(newKey) }),
    });
  }

  _load(saved) {
    this.account = saved.account;
    this.secret = saved.secret ? unb64(saved.secret) : null;
    if (saved.lastUpload) this.lastUpload = saved.lastUpload;
    if (saved.kyber === false && LIBSIGNAL.x3dh) this.kyber = false;
    if (saved.signal) {
      this.signal = SignalState.fromJSON(saved.signal, {
        onIdentityChange: (who, oldKey, newKey) =>
          this.emit({ event: 'identity_change', account: who, old_identity_key: b64(oldKey), new_identity_key: b64(newKey) }),
      });
    }
  }

  /** Encrypts `plaintext` (serialized Content) for `to` and sends it; fetches a bundle first if needed. */
  async _sendPairwise(to, plaintext, { message_id, timestamp }) {
    const addr = addressOf(to);
    const enc = await this.lock.run(async () => {
      let newSession = false;
      const rec = await this.signal.sessions.getSession(addr);
      if (!rec || !rec.hasCurrentState()) {
        const { value: b } = await this._req('fetch_bundle', { account: to });
        // X3DH when it has no kyber_prekey; with Kyber off this contact is an X3DH-era client,
        // which knows nothing of Kyber prekeys and starts X3DH even from a bundle that has one.
        const usable = this.kyber ? b : { ...b, kyber_prekey: null };
        const bundle = L.preKeyBundleFrom({ ...usable, account: b.account || to });
        await L.processPreKeyBundle(bundle, addr, this.signal.address, this.signal.sessions, this.signal.identities);
        newSession = true;
      }
      const ct = await L.signalEncrypt(plaintext, addr, this.signal.address, this.signal.sessions, this.signal.identities);
      const bytes = Buffer.from(ct.serialize());
      return { bytes, newSession, info: describeCiphertext(ct.type(), bytes) };
    });
    const { value: sent } = await this._req('send', { to, kind: enc.info.kind, ciphertext: enc.bytes, message_id, timestamp });
    return { message_id: sent.message_id, server_timestamp: sent.server_timestamp, recipients: sent.recipients, new_session: enc.newSession, ...enc.info };
  }

  _senderKeyFor(group) {
    let st = this.senderKeyState.get(group);
    if (!st) {
      st = { distributionId: crypto.randomUUID(), sentTo: new Set() };
      this.senderKeyState.set(group, st);
    }
    return st;
  }

  /** Records a group's new state; a removed member makes us start a new sender key (§16.5). */
  _groupChanged(g) {
    this.groups.set(g.id, g);
    const st = this.senderKeyState.get(g.id);
    if (st && [...st.sentTo].some((m) => !g.members.includes(m))) this.senderKeyState.delete(g.id);
    if (!g.members.includes(this.account)) this.senderKeyState.delete(g.id);
  }

  async _uploadBlob(bytes) {
    const upload = crypto.randomUUID();
    const hash = content.sha256(bytes);
    let offset = 0;
    for (;;) {
      const data = bytes.subarray(offset, Math.min(offset + CHUNK, bytes.length));
      const last = offset + data.length >= bytes.length;
      const body = { upload, offset, data, last };
      if (last) body.sha256 = hash;
      const { name, value } = await this._req('blob_put', body, { timeoutMs: 120000 });
      offset += data.length;
      if (last) {
        if (name !== 'blob_stored') throw new Error(`expected BlobStored, got ${name}`);
        return value;
      }
    }
  }

  async _downloadBlob(blob) {
    const parts = [];
    let offset = 0;
    let total = null;
    while (total === null || offset < total) {
      const { value } = await this._req('blob_get', { blob, offset, length: CHUNK }, { timeoutMs: 120000 });
      total = value.total_size;
      if (value.data.length === 0 && offset < total) throw new Error('gateway returned an empty chunk');
      parts.push(Buffer.from(value.data));
      offset += value.data.length;
    }
    return Buffer.concat(parts);
  }

  _onPush(name, v) {
    switch (name) {
      case 'envelope':
        this.inbox = this.inbox.then(() => this._processEnvelope(v)).catch((e) => this.emit({ event: 'agent_error', error: String(e && e.stack || e) }));
        break;
      case 'queue_drained':
        this.inbox = this.inbox.then(() => this.emit({ event: 'queue_drained', delivered: v.delivered }));
        break;
      case 'typing':
        this.emit({ event: 'typing', from: v.from, group: v.group, typing: v.typing });
        break;
      case 'presence':
        this.emit({ event: 'presence', account: v.account, online: v.online, last_seen: v.last_seen });
        break;
      case 'prekeys_low':
        this.emit({ event: 'prekeys_low', one_time_prekeys: v.one_time_prekeys, kyber_prekeys: v.kyber_prekeys });
        if (this.autoReplenish > 0 && this.loggedIn) {
          this.inbox = this.inbox.then(() => this._replenish());
        }
        break;
      case 'error':
        this.emit({ event: 'gateway_error', code: v.code, message: v.message, retry_after_ms: v.retry_after_ms });
        break;
      default:
        this.emit({ event: 'unexpected_push', stanza: name });
    }
  }

  async _replenish() {
    // Add one-time keys only: generateUpload also rotates the signed and last-resort keys, which is fine.
    const n = this.autoReplenish;
    const body = await this.lock.run(async () => this.signal.generateUpload({ oneTime: n, kyber: n, withKyber: this.kyber }));
    const { value } = await this._req('upload_keys', body);
    this.emit({ event: 'keys_replenished', one_time_prekeys: value.one_time_prekeys, kyber_prekeys: value.kyber_prekeys });
  }

  async _processEnvelope(env) {
    const base = { envelope_id: env.id, from: env.from, timestamp: env.timestamp, server_timestamp: env.server_timestamp };
    const previous = this.seen.get(env.id);
    if (previous) {
      // redelivered after a reconnect (§7): report again, do not decrypt twice
      this.emit({ ...previous, redelivered: true });
      await this._ack(env.id);
      return;
    }
    let event;
    try {
      event = await this._interpret(env, base);
    } catch (e) {
      const duplicate = e && e.code === S.ErrorCode.DuplicatedMessage;
      event = { event: duplicate ? 'duplicate' : 'decrypt_error', ...base, kind: env.kind, message_id: env.message_id, group: env.group, error: `${e && e.name}: ${e && e.message}` };
    }
    if (event) {
      this._remember(env.id, event);
      this.emit(event);
    }
    await this._ack(env.id);
    if (event && event.event === 'message' && this.autoReceipts) {
      await this._req('send_receipt', { to: env.from, receipt: { type: 'DELIVERED', message_ids: [env.message_id], group: env.group } }).catch((e) =>
        this.emit({ event: 'agent_error', error: `auto receipt failed: ${e.message}` }),
      );
    }
  }

  async _interpret(env, base) {
    switch (env.kind) {
      case 'PREKEY':
      case 'MESSAGE': {
        const addr = addressOf(env.from);
        const pt = await this.lock.run(() =>
          env.kind === 'PREKEY'
            ? L.signalDecryptPreKey(S.PreKeySignalMessage.deserialize(Buffer.from(env.ciphertext)), addr, this.signal.address, this.signal.sessions, this.signal.identities, this.signal.preKeys, this.signal.signedPreKeys, this.signal.kyberPreKeys)
            : L.signalDecrypt(S.SignalMessage.deserialize(Buffer.from(env.ciphertext)), addr, this.signal.address, this.signal.sessions, this.signal.identities),
        );
        const c = content.parseContent(Buffer.from(pt));
        const info = describeCiphertext(env.kind === 'PREKEY' ? S.CiphertextMessageType.PreKey : S.CiphertextMessageType.Whisper, env.ciphertext);
        if (c.kind === 'sender_key_distribution') {
          const skdm = S.SenderKeyDistributionMessage.deserialize(Buffer.from(c.value.distribution_message));
          await this.lock.run(() => S.processSenderKeyDistributionMessage(addr, skdm, this.signal.senderKeys));
          return { event: 'sender_key', ...base, group: c.value.group, distribution_id: skdm.distributionId(), kind: env.kind };
        }
        const pq = env.kind === 'PREKEY' ? { pqxdh: info.pqxdh } : {};
        return { event: 'message', ...base, kind: env.kind, message_id: env.message_id, group: '', content: c.json, spqr: info.spqr, message_version: info.message_version, ...pq };
      }
      case 'GROUP': {
        const addr = addressOf(env.from);
        const pt = await this.lock.run(() => S.groupDecrypt(addr, this.signal.senderKeys, Buffer.from(env.ciphertext)));
        const c = content.parseContent(Buffer.from(pt));
        if (c.kind !== 'data') throw new Error('group ciphertext without a DataMessage');
        return { event: 'message', ...base, kind: 'GROUP', message_id: env.message_id, group: env.group, content: c.json };
      }
      case 'RECEIPT':
        return { event: 'receipt', ...base, type: env.receipt.type, message_ids: env.receipt.message_ids, group: env.receipt.group };
      case 'GROUP_UPDATE': {
        const before = this.groups.get(env.group);
        this._groupChanged(env.group_update);
        return {
          event: 'group_update',
          ...base,
          group: groupJson(env.group_update),
          changed_by: env.group_update.changed_by,
          previous_members: before ? [...before.members] : null,
        };
      }
      default:
        return { event: 'unknown_envelope', ...base, kind: env.kind };
    }
  }

  _remember(id, event) {
    this.seen.set(id, event);
    if (this.seen.size > REMEMBERED_ENVELOPES) this.seen.delete(this.seen.keys().next().value);
  }

  async _ack(id) {
    if (this.holdAcks) {
      this.heldAcks.add(id);
      return;
    }
    await this._req('ack', { envelope_ids: [id] }).catch((e) => this.emit({ event: 'agent_error', error: `ack failed: ${e.message}` }));
  }
}

module.exports = { Contact, describeCiphertext, GatewayError, LIBSIGNAL };
