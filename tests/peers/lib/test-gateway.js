// A small in-memory gateway for the self test of this package. It follows docs/interop-protocol.md
// for the requests the test contact uses, so the contact can be exercised without the reference
// gateway. It is not the reference gateway: no persistence, no rate limit, no idle timeout,
// no presence fan-out rules beyond the basics. Accounts that upload no Kyber keys at all (X3DH-era
// clients, see set_kyber) are accepted, and their bundles have no kyber_prekey.
'use strict';

const crypto = require('crypto');
const transport = require('./noise-transport');
const { encodeStanza, decodeStanza, CLIENT_BODIES } = require('./proto');
const { S } = require('./signal-stores');

const ACCOUNT_RE = /^\+[0-9]{8,15}$/;
const CHUNK = 512 * 1024;

class GErr extends Error {
  constructor(code, message = '') {
    super(message);
    this.code = code;
  }
}

const checkAccount = (a) => {
  if (typeof a !== 'string' || !ACCOUNT_RE.test(a)) throw new GErr('BAD_REQUEST', `bad account ${JSON.stringify(a)}`);
};
const hex128 = () => crypto.randomBytes(16).toString('hex');
const isEc = (k) => k && k.length === 33 && k[0] === 0x05;
const isKyber = (k) => k && k.length === 1569 && k[0] === 0x08;

class TestGateway {
  constructor({ code = '123456', maxBlob = 100 * 1024 * 1024 } = {}) {
    this.fixedCode = code;
    this.maxBlob = maxBlob;
    this.staticKeyPair = transport.generateStaticKeyPair();
    this.accounts = new Map();
    this.codes = new Map();
    this.envelopes = new Map();
    this.seq = 0;
    this.sentIds = new Map();
    this.groups = new Map();
    this.blobs = new Map();
    this.related = new Set();
    this.server = null;
  }

  get publicKey() {
    return Buffer.from(this.staticKeyPair.publicKey).toString('base64');
  }

  async start() {
    this.server = await transport.listen({ staticKeyPair: this.staticKeyPair }, (ch) => this._accept(ch));
    this.port = this.server.address().port;
    return this;
  }

  stop() {
    for (const a of this.accounts.values()) if (a.conn) a.conn.channel.close('gateway stopping');
    return new Promise((r) => this.server.close(r));
  }

  _accept(channel) {
    const conn = { channel, account: null, uploads: new Map() };
    channel.on('oversize', () => this._push(conn, 'error', { code: 'TOO_LARGE', message: 'record over 1 MiB' }));
    channel.on('record', (bytes) => this._onRecord(conn, bytes));
    channel.on('close', () => this._onClose(conn));
    channel.handshake().catch(() => {});
  }

  _write(conn, id, name, value) {
    if (!conn.channel.closed) conn.channel.sendRecord(encodeStanza({ id, [name]: value }));
  }

  _push(conn, name, value) {
    this._write(conn, 0, name, value);
  }

  _onRecord(conn, bytes) {
    let st;
    try {
      st = decodeStanza(bytes);
    } catch (e) {
      this._push(conn, 'error', { code: 'BAD_REQUEST', message: 'undecodable stanza' });
      conn.channel.close('malformed');
      return;
    }
    const name = st.body;
    if (!name || !CLIENT_BODIES.has(name) || (st.id === 0 && name !== 'ack')) {
      this._write(conn, st.id, 'error', { code: 'BAD_REQUEST', message: 'malformed stanza' });
      conn.channel.close('malformed');
      return;
    }
    try {
      if (!conn.account && !['register', 'verify', 'login', 'ping'].includes(name)) throw new GErr('UNAUTHORIZED', 'login first');
      const answer = this[`_${name}`](conn, st[name]);
      if (st.id !== 0 && answer) this._write(conn, st.id, answer[0], answer[1]);
      if (answer && answer[2]) answer[2]();
    } catch (e) {
      if (!(e instanceof GErr)) throw e;
      this._write(conn, st.id, 'error', { code: e.code, message: e.message });
    }
  }

  _onClose(conn) {
    const acc = conn.account && this.accounts.get(conn.account);
    if (acc && acc.conn === conn) {
      acc.conn = null;
      if (acc.online) this._setPresence(conn.account, false);
    }
  }

  // ---- accounts
  _register(conn, { account }) {
    checkAccount(account);
    this.codes.set(account, { code: this.fixedCode, at: Date.now(), tries: 0 });
    return ['ok', {}];
  }

  _verify(conn, { account, code }) {
    checkAccount(account);
    const pending = this.codes.get(account);
    if (!pending || pending.tries >= 5) throw new GErr('BAD_CODE', 'no code pending');
    if (Date.now() - pending.at > 10 * 60 * 1000) {
      this.codes.delete(account);
      throw new GErr('CODE_EXPIRED');
    }
    if (code !== pending.code) {
      pending.tries += 1;
      throw new GErr('BAD_CODE', 'wrong code');
    }
    this.codes.delete(account);
    const secret = crypto.randomBytes(32);
    let acc = this.accounts.get(account);
    if (!acc) {
      acc = { secret, keys: null, conn: null, queue: [], online: false, profile: { name: '', avatar_blob: '' } };
      this.accounts.set(account, acc);
    } else {
      acc.secret = secret;
      if (acc.conn) {
        this._push(acc.conn, 'error', { code: 'UNAUTHORIZED', message: 'account re-registered' });
        acc.conn.channel.close('re-registered');
        acc.conn = null;
      }
    }
    return ['registered', { account, secret }];
  }

  _login(conn, { account, secret }) {
    checkAccount(account);
    if (conn.account) throw new GErr('BAD_REQUEST', 'already logged in');
    const acc = this.accounts.get(account);
    if (!acc || !acc.secret.equals(Buffer.from(secret))) throw new GErr('UNAUTHORIZED', 'bad credentials');
    if (acc.conn) {
      this._push(acc.conn, 'error', { code: 'CONFLICT', message: 'logged in elsewhere' });
      acc.conn.channel.close('conflict');
    }
    acc.conn = conn;
    conn.account = account;
    const queued = [...acc.queue];
    const k = acc.keys;
    return [
      'logged_in',
      { account, queued: queued.length, one_time_prekeys: k ? k.otks.length : 0, kyber_prekeys: k ? k.kyber.length : 0 },
      () => {
        for (const id of queued) this._push(conn, 'envelope', this.envelopes.get(id));
        this._push(conn, 'queue_drained', { delivered: queued.length });
      },
    ];
  }

  _ping(conn, { nonce }) {
    return ['pong', { nonce }];
  }

  // ---- keys
  _upload_keys(conn, b) {
    if (!isEc(b.identity_key)) throw new GErr('BAD_REQUEST', 'identity key');
    if (!(b.registration_id >= 1 && b.registration_id <= 16383)) throw new GErr('BAD_REQUEST', 'registration id');
    const ik = S.PublicKey.deserialize(Buffer.from(b.identity_key));
    const signed = [b.signed_prekey, b.kyber_last_resort, ...b.kyber_prekeys].filter(Boolean);
    for (const k of [b.signed_prekey, ...b.one_time_prekeys].filter(Boolean)) if (!isEc(k.public_key)) throw new GErr('BAD_REQUEST', 'EC key');
    for (const k of [b.kyber_last_resort, ...b.kyber_prekeys].filter(Boolean)) if (!isKyber(k.public_key)) throw new GErr('BAD_REQUEST', 'Kyber key');
    for (const k of signed) {
      if (k.signature.length !== 64 || !ik.verify(Buffer.from(k.public_key), Buffer.from(k.signature))) throw new GErr('BAD_REQUEST', 'bad signature');
    }
    const acc = this.accounts.get(conn.account);
    let keys = acc.keys;
    if (!keys || !Buffer.from(keys.identity_key).equals(Buffer.from(b.identity_key))) {
      keys = { identity_key: b.identity_key, spk: null, klr: null, otks: [], kyber: [] };
    }
    if (!(b.signed_prekey || keys.spk)) throw new GErr('BAD_REQUEST', 'signed prekey needed');
    // Kyber keys are optional as a whole (an X3DH-era client has none), but one-time Kyber prekeys need a last-resort one.
    if (b.kyber_prekeys.length && !(b.kyber_last_resort || keys.klr)) throw new GErr('BAD_REQUEST', 'Kyber prekeys need a Kyber last-resort prekey');
    const merge = (list, add) => {
      const ids = new Set(add.map((k) => k.id));
      return [...list.filter((k) => !ids.has(k.id)), ...add];
    };
    const otks = merge(keys.otks, b.one_time_prekeys);
    const kyber = merge(keys.kyber, b.kyber_prekeys);
    if (otks.length > 1000 || kyber.length > 1000) throw new GErr('BAD_REQUEST', 'too many prekeys');
    acc.keys = { ...keys, registration_id: b.registration_id, spk: b.signed_prekey || keys.spk, klr: b.kyber_last_resort || keys.klr, otks, kyber };
    return ['key_counts_result', { one_time_prekeys: otks.length, kyber_prekeys: kyber.length }];
  }

  _key_counts(conn) {
    const k = this.accounts.get(conn.account).keys;
    return ['key_counts_result', { one_time_prekeys: k ? k.otks.length : 0, kyber_prekeys: k ? k.kyber.length : 0 }];
  }

  _fetch_bundle(conn, { account }) {
    checkAccount(account);
    const acc = this.accounts.get(account);
    if (!acc || !acc.keys) throw new GErr('NOT_FOUND');
    const k = acc.keys;
    const bundle = { account, device_id: 1, registration_id: k.registration_id, identity_key: k.identity_key, signed_prekey: k.spk };
    const kyber = k.kyber.length ? k.kyber.shift() : k.klr;
    if (kyber) bundle.kyber_prekey = kyber; // none for an account without Kyber keys (X3DH)
    if (k.otks.length) bundle.one_time_prekey = k.otks.shift();
    const after = () => {
      const kyberLow = !!k.klr && k.kyber.length < 10; // an account without Kyber keys is not reminded of them
      if ((k.otks.length < 10 || kyberLow) && acc.conn) this._push(acc.conn, 'prekeys_low', { one_time_prekeys: k.otks.length, kyber_prekeys: k.kyber.length });
    };
    return ['bundle', bundle, after];
  }

  // ---- envelopes
  _store(to, env) {
    const e = { ...env, id: ++this.seq, to };
    this.envelopes.set(e.id, e);
    const acc = this.accounts.get(to);
    acc.queue.push(e.id);
    this.related.add(`${env.from}|${to}`).add(`${to}|${env.from}`);
    return e;
  }

  _deliver(stored) {
    for (const e of stored) {
      const acc = this.accounts.get(e.to);
      if (acc.conn) this._push(acc.conn, 'envelope', e);
    }
  }

  _send(conn, b) {
    const from = conn.account;
    if (!['PREKEY', 'MESSAGE', 'GROUP'].includes(b.kind) || !b.ciphertext.length || !b.message_id || b.message_id.length > 128) throw new GErr('BAD_REQUEST');
    let recipients;
    if (b.kind === 'GROUP') {
      if (!b.group || b.to) throw new GErr('BAD_REQUEST');
      const g = this.groups.get(b.group);
      if (!g) throw new GErr('NOT_FOUND');
      if (!g.members.includes(from)) throw new GErr('NOT_MEMBER');
      recipients = g.members.filter((m) => m !== from);
    } else {
      checkAccount(b.to);
      if (b.to === from || b.group) throw new GErr('BAD_REQUEST');
      if (!this.accounts.has(b.to)) throw new GErr('NOT_FOUND');
      recipients = [b.to];
    }
    const key = `${from}/${b.message_id}`;
    if (this.sentIds.has(key)) return ['sent', this.sentIds.get(key)];
    const now = Date.now();
    const stored = recipients.map((to) => this._store(to, { from, timestamp: b.timestamp, server_timestamp: now, kind: b.kind, ciphertext: b.ciphertext, message_id: b.message_id, group: b.group || '' }));
    const sent = { message_id: b.message_id, server_timestamp: now, recipients: stored.length };
    this.sentIds.set(key, sent);
    return ['sent', sent, () => this._deliver(stored)];
  }

  _ack(conn, { envelope_ids }) {
    const acc = this.accounts.get(conn.account);
    const ids = new Set(envelope_ids);
    acc.queue = acc.queue.filter((id) => {
      if (!ids.has(id)) return true;
      this.envelopes.delete(id);
      return false;
    });
    return ['ok', {}];
  }

  _send_receipt(conn, { to, receipt }) {
    checkAccount(to);
    if (!receipt || !['DELIVERED', 'READ'].includes(receipt.type) || !receipt.message_ids.length) throw new GErr('BAD_REQUEST');
    if (!this.accounts.has(to)) throw new GErr('NOT_FOUND');
    const now = Date.now();
    const e = this._store(to, { from: conn.account, timestamp: now, server_timestamp: now, kind: 'RECEIPT', message_id: '', group: '', receipt });
    return ['ok', {}, () => this._deliver([e])];
  }

  _send_typing(conn, { to, group, typing }) {
    if (!!to === !!group) throw new GErr('BAD_REQUEST');
    let targets;
    if (to) {
      checkAccount(to);
      if (!this.accounts.has(to)) throw new GErr('NOT_FOUND');
      targets = [to];
    } else {
      const g = this.groups.get(group);
      if (!g) throw new GErr('NOT_FOUND');
      if (!g.members.includes(conn.account)) throw new GErr('NOT_MEMBER');
      targets = g.members.filter((m) => m !== conn.account);
    }
    return ['ok', {}, () => {
      for (const t of targets) {
        const acc = this.accounts.get(t);
        if (acc.conn) this._push(acc.conn, 'typing', { from: conn.account, group: group || '', typing });
      }
    }];
  }

  _set_presence(conn, { online }) {
    return ['ok', {}, () => this._setPresence(conn.account, online)];
  }

  _setPresence(account, online) {
    const acc = this.accounts.get(account);
    if (acc.online === online) return;
    acc.online = online;
    const now = Date.now();
    for (const [other, o] of this.accounts) {
      if (other !== account && o.conn && this.related.has(`${account}|${other}`)) this._push(o.conn, 'presence', { account, online, last_seen: now });
    }
  }

  _set_profile(conn, { name, avatar_blob }) {
    if (Buffer.byteLength(name) > 256) throw new GErr('BAD_REQUEST');
    this.accounts.get(conn.account).profile = { name, avatar_blob };
    return ['ok', {}];
  }

  _get_profile(conn, { account }) {
    checkAccount(account);
    const acc = this.accounts.get(account);
    if (!acc) throw new GErr('NOT_FOUND');
    return ['profile', { account, ...acc.profile }];
  }

  // ---- groups
  _groupUpdate(g, targets, by) {
    const now = Date.now();
    return targets.filter((t) => t !== by).map((t) => this._store(t, { from: by, timestamp: now, server_timestamp: now, kind: 'GROUP_UPDATE', message_id: '', group: g.id, group_update: { ...g, members: [...g.members] } }));
  }

  _create_group(conn, { name, members }) {
    members.forEach(checkAccount);
    for (const m of members) if (!this.accounts.has(m)) throw new GErr('NOT_FOUND', m);
    const g = { id: hex128(), name, avatar_blob: '', members: [...new Set([conn.account, ...members])], changed_by: conn.account, revision: 1 };
    this.groups.set(g.id, g);
    const stored = this._groupUpdate(g, g.members, conn.account);
    return ['group', g, () => this._deliver(stored)];
  }

  _update_group(conn, b) {
    const g = this.groups.get(b.group);
    if (!g) throw new GErr('NOT_FOUND');
    if (!g.members.includes(conn.account)) throw new GErr('NOT_MEMBER');
    [...b.add, ...b.remove].forEach(checkAccount);
    for (const m of b.add) if (!this.accounts.has(m)) throw new GErr('NOT_FOUND', m);
    const before = [...g.members];
    g.members = [...new Set([...g.members, ...b.add])].filter((m) => !b.remove.includes(m));
    if (b.name !== undefined && b.name !== null) g.name = b.name;
    if (b.avatar_blob !== undefined && b.avatar_blob !== null) g.avatar_blob = b.avatar_blob;
    g.revision += 1;
    g.changed_by = conn.account;
    const stored = this._groupUpdate(g, [...new Set([...before, ...g.members])], conn.account);
    return ['group', g, () => this._deliver(stored)];
  }

  _get_group(conn, { group }) {
    const g = this.groups.get(group);
    if (!g) throw new GErr('NOT_FOUND');
    if (!g.members.includes(conn.account)) throw new GErr('NOT_MEMBER');
    return ['group', g];
  }

  // ---- blobs
  _blob_put(conn, b) {
    if (b.data.length > CHUNK) throw new GErr('BAD_REQUEST', 'chunk too large');
    let up = conn.uploads.get(b.upload);
    if (!up) {
      if (b.offset !== 0) throw new GErr('BAD_REQUEST', 'unknown upload');
      up = { parts: [], size: 0 };
      conn.uploads.set(b.upload, up);
    }
    if (b.offset !== up.size) throw new GErr('BAD_REQUEST', `offset must be ${up.size}`);
    if (up.size + b.data.length > this.maxBlob) {
      conn.uploads.delete(b.upload);
      throw new GErr('TOO_LARGE');
    }
    up.parts.push(Buffer.from(b.data));
    up.size += b.data.length;
    if (!b.last) return ['ok', {}];
    conn.uploads.delete(b.upload);
    const blob = Buffer.concat(up.parts);
    if (b.sha256.length !== 32 || !crypto.createHash('sha256').update(blob).digest().equals(Buffer.from(b.sha256))) throw new GErr('BAD_REQUEST', 'sha256 mismatch');
    const id = hex128();
    this.blobs.set(id, blob);
    return ['blob_stored', { blob: id, size: blob.length }];
  }

  _blob_get(conn, { blob, offset, length }) {
    const data = this.blobs.get(blob);
    if (!data) throw new GErr('NOT_FOUND');
    const len = length || CHUNK;
    if (len > CHUNK || offset > data.length) throw new GErr('BAD_REQUEST');
    return ['blob_data', { blob, offset, data: data.subarray(offset, offset + len), total_size: data.length }];
  }
}

module.exports = { TestGateway };
