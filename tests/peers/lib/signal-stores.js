// In-memory stores for the official libsignal (@signalapp/libsignal-client, or 0.72.1 with
// MIB_CONTACT_LIBSIGNAL=x3dh: see libsignal.js), and one account's Signal state: identity,
// registration id, prekeys, sessions, sender keys.
// Records are kept serialized, as a real client would keep them on disk. A state can be exported to
// JSON and imported again (the demo contact uses that to survive restarts).
'use strict';

const { S, identityChange } = require('./libsignal');

const DEVICE_ID = 1; // one device per account (docs/interop-protocol.md §14.1)

const b64 = (u) => Buffer.from(u).toString('base64');
const unb64 = (s) => Buffer.from(s, 'base64');
const addrKey = (a) => `${a.name()}.${a.deviceId()}`;

/** A ProtocolAddress for an account. */
function addressOf(account) {
  return S.ProtocolAddress.new(account, DEVICE_ID);
}

/** Serialized-record map with JSON export, shared by the stores below. */
class RecordMap {
  constructor() {
    this.m = new Map();
  }
  get(k) {
    return this.m.get(k);
  }
  set(k, v) {
    this.m.set(k, Buffer.from(v));
  }
  delete(k) {
    this.m.delete(k);
  }
  clear() {
    this.m.clear();
  }
  toJSON() {
    return Object.fromEntries([...this.m].map(([k, v]) => [k, b64(v)]));
  }
  load(obj) {
    this.m = new Map(Object.entries(obj || {}).map(([k, v]) => [k, unb64(v)]));
  }
}

class SessionStore extends S.SessionStore {
  constructor() {
    super();
    this.records = new RecordMap();
  }
  async saveSession(address, record) {
    this.records.set(addrKey(address), record.serialize());
  }
  async getSession(address) {
    const v = this.records.get(addrKey(address));
    return v ? S.SessionRecord.deserialize(v) : null;
  }
  async getExistingSessions(addresses) {
    return addresses.map((a) => {
      const v = this.records.get(addrKey(a));
      if (!v) throw new Error(`no session for ${addrKey(a)}`);
      return S.SessionRecord.deserialize(v);
    });
  }
}

/**
 * Trust on first use, then accept changes (§14.4). `onChange(account, oldKey, newKey)` is called
 * when a stored identity is replaced by a different one.
 */
class IdentityStore extends S.IdentityKeyStore {
  constructor(state, onChange) {
    super();
    this.state = state;
    this.onChange = onChange || (() => {});
    this.records = new RecordMap();
  }
  async getIdentityKey() {
    return this.state.identity.privateKey;
  }
  async getLocalRegistrationId() {
    return this.state.registrationId;
  }
  async saveIdentity(address, key) {
    const k = addrKey(address);
    const old = this.records.get(k);
    const now = Buffer.from(key.serialize());
    this.records.set(k, now);
    if (old && !old.equals(now)) {
      this.onChange(address.name(), old, now);
      return identityChange(true);
    }
    return identityChange(false);
  }
  async isTrustedIdentity() {
    return true;
  }
  async getIdentity(address) {
    const v = this.records.get(addrKey(address));
    return v ? S.PublicKey.deserialize(v) : null;
  }
}

class PreKeyStore extends S.PreKeyStore {
  constructor() {
    super();
    this.records = new RecordMap();
  }
  async savePreKey(id, record) {
    this.records.set(String(id), record.serialize());
  }
  async getPreKey(id) {
    const v = this.records.get(String(id));
    if (!v) throw new Error(`no prekey ${id}`);
    return S.PreKeyRecord.deserialize(v);
  }
  async removePreKey(id) {
    this.records.delete(String(id));
  }
}

class SignedPreKeyStore extends S.SignedPreKeyStore {
  constructor() {
    super();
    this.records = new RecordMap();
  }
  async saveSignedPreKey(id, record) {
    this.records.set(String(id), record.serialize());
  }
  async getSignedPreKey(id) {
    const v = this.records.get(String(id));
    if (!v) throw new Error(`no signed prekey ${id}`);
    return S.SignedPreKeyRecord.deserialize(v);
  }
}

/** Kyber prekeys: one-time ones are deleted once used, last-resort ones are kept. */
class KyberPreKeyStore extends S.KyberPreKeyStore {
  constructor() {
    super();
    this.records = new RecordMap();
    this.lastResort = new Set();
  }
  async saveKyberPreKey(id, record) {
    this.records.set(String(id), record.serialize());
  }
  async getKyberPreKey(id) {
    const v = this.records.get(String(id));
    if (!v) throw new Error(`no kyber prekey ${id}`);
    return S.KyberPreKeyRecord.deserialize(v);
  }
  // 0.103 passes (id, signedPreKeyId, baseKey), 0.72.1 (id): only the id matters here.
  async markKyberPreKeyUsed(id) {
    if (!this.lastResort.has(id)) this.records.delete(String(id));
  }
}

class SenderKeyStore extends S.SenderKeyStore {
  constructor() {
    super();
    this.records = new RecordMap();
  }
  async saveSenderKey(sender, distributionId, record) {
    this.records.set(`${addrKey(sender)}/${distributionId}`, record.serialize());
  }
  async getSenderKey(sender, distributionId) {
    const v = this.records.get(`${addrKey(sender)}/${distributionId}`);
    return v ? S.SenderKeyRecord.deserialize(v) : null;
  }
}

/** A fresh registration id: 14 bits, 1..16380 like libsignal's own generator. */
function newRegistrationId() {
  return 1 + Math.floor(Math.random() * 16380);
}

/** Everything Signal-related that one account keeps. */
class SignalState {
  constructor(account, { onIdentityChange } = {}) {
    this.account = account;
    this.address = addressOf(account);
    this.identity = S.IdentityKeyPair.generate();
    this.registrationId = newRegistrationId();
    this.sessions = new SessionStore();
    this.identities = new IdentityStore(this, onIdentityChange);
    this.preKeys = new PreKeyStore();
    this.signedPreKeys = new SignedPreKeyStore();
    this.kyberPreKeys = new KyberPreKeyStore();
    this.senderKeys = new SenderKeyStore();
    this.nextPreKeyId = 1;
    this.nextSignedPreKeyId = 1;
    this.nextKyberPreKeyId = 1; // one id space for one-time and last-resort Kyber keys (§14.1)
  }

  get identityKey() {
    return Buffer.from(this.identity.publicKey.serialize());
  }

  /** A new identity (a "reinstall"): drops sessions, own prekeys and sender keys. */
  resetIdentity() {
    this.identity = S.IdentityKeyPair.generate();
    this.registrationId = newRegistrationId();
    this.sessions.records.clear();
    this.preKeys.records.clear();
    this.signedPreKeys.records.clear();
    this.kyberPreKeys.records.clear();
    this.kyberPreKeys.lastResort.clear();
    this.senderKeys.records.clear();
  }

  /**
   * Generates keys and stores their private halves; returns the UploadKeys body (§8.1).
   * A new signed prekey and Kyber last-resort key are made each time. With `withKyber: false` (an
   * X3DH-era client) the body has no Kyber keys at all: no `kyber_last_resort`, no `kyber_prekeys`.
   */
  generateUpload({ oneTime = 0, kyber = 0, withKyber = true } = {}) {
    const priv = this.identity.privateKey;
    const now = Date.now();
    const body = {
      identity_key: this.identityKey,
      registration_id: this.registrationId,
      one_time_prekeys: [],
      kyber_prekeys: [],
    };

    const spkId = this.nextSignedPreKeyId++;
    const spk = S.PrivateKey.generate();
    const spkPub = spk.getPublicKey().serialize();
    const spkSig = priv.sign(spkPub);
    this.signedPreKeys.records.set(String(spkId), S.SignedPreKeyRecord.new(spkId, now, spk.getPublicKey(), spk, spkSig).serialize());
    body.signed_prekey = { id: spkId, public_key: Buffer.from(spkPub), signature: Buffer.from(spkSig) };

    const makeKyber = () => {
      const id = this.nextKyberPreKeyId++;
      const kp = S.KEMKeyPair.generate();
      const pub = kp.getPublicKey().serialize();
      const sig = priv.sign(pub);
      this.kyberPreKeys.records.set(String(id), S.KyberPreKeyRecord.new(id, now, kp, sig).serialize());
      return { id, public_key: Buffer.from(pub), signature: Buffer.from(sig) };
    };
    if (withKyber) {
      body.kyber_last_resort = makeKyber();
      this.kyberPreKeys.lastResort.add(body.kyber_last_resort.id);
    }

    for (let i = 0; i < oneTime; i++) {
      const id = this.nextPreKeyId++;
      const k = S.PrivateKey.generate();
      this.preKeys.records.set(String(id), S.PreKeyRecord.new(id, k.getPublicKey(), k).serialize());
      body.one_time_prekeys.push({ id, public_key: Buffer.from(k.getPublicKey().serialize()) });
    }
    if (withKyber) for (let i = 0; i < kyber; i++) body.kyber_prekeys.push(makeKyber());
    return body;
  }

  toJSON() {
    return {
      account: this.account,
      identity: b64(this.identity.serialize()),
      registrationId: this.registrationId,
      sessions: this.sessions.records.toJSON(),
      identities: this.identities.records.toJSON(),
      preKeys: this.preKeys.records.toJSON(),
      signedPreKeys: this.signedPreKeys.records.toJSON(),
      kyberPreKeys: this.kyberPreKeys.records.toJSON(),
      kyberLastResort: [...this.kyberPreKeys.lastResort],
      senderKeys: this.senderKeys.records.toJSON(),
      next: [this.nextPreKeyId, this.nextSignedPreKeyId, this.nextKyberPreKeyId],
    };
  }

  static fromJSON(obj, opts) {
    const st = new SignalState(obj.account, opts);
    st.identity = S.IdentityKeyPair.deserialize(unb64(obj.identity));
    st.registrationId = obj.registrationId;
    st.sessions.records.load(obj.sessions);
    st.identities.records.load(obj.identities);
    st.preKeys.records.load(obj.preKeys);
    st.signedPreKeys.records.load(obj.signedPreKeys);
    st.kyberPreKeys.records.load(obj.kyberPreKeys);
    st.kyberPreKeys.lastResort = new Set(obj.kyberLastResort || []);
    st.senderKeys.records.load(obj.senderKeys);
    [st.nextPreKeyId, st.nextSignedPreKeyId, st.nextKyberPreKeyId] = obj.next;
    return st;
  }
}

/** Runs async functions one at a time (libsignal store updates must not interleave). */
class Mutex {
  constructor() {
    this.tail = Promise.resolve();
  }
  run(fn) {
    const result = this.tail.then(() => fn());
    this.tail = result.catch(() => {});
    return result;
  }
}

module.exports = { S, DEVICE_ID, addressOf, SignalState, Mutex, newRegistrationId };
