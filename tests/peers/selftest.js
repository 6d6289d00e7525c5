#!/usr/bin/env node
// Self test of the test contact, without the reference gateway:
//  - protobuf round trip of every stanza body and every content body (schemas loaded from ../../proto)
//  - media encryption helpers
//  - Noise: the known-answer vector of docs/interop-protocol.md §20, then a real XX handshake and the
//    record framing between two in-process endpoints over loopback TCP
//  - the contact agent end to end against a small in-process gateway (lib/test-gateway.js, or a real
//    gateway given by INTEROP_GATEWAY, see below), the JSON-lines CLI and the demo contact in child
//    processes
//  - libsignal 0.72.1 (MIB_CONTACT_LIBSIGNAL=x3dh) in contact.js child processes: X3DH-era contacts
//    without Kyber keys (set_kyber) chatting over X3DH, one of them turning Kyber on, a group of 0.72.1
//    contacts, and that 0.72.1 and 0.103.0 contacts cannot start sessions with each other
// Prints one line per test and a final "N passed, M failed"; exits non-zero on failure.
'use strict';

const assert = require('assert/strict');
const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');
const readline = require('readline');

// The contacts in this process use the current libsignal; the x3dh ones run as child processes.
process.env.MIB_CONTACT_LIBSIGNAL = 'current';

const proto = require('./lib/proto');
const transport = require('./lib/noise-transport');
const content = require('./lib/content');
const { Contact } = require('./lib/contact-agent');
const { TestGateway } = require('./lib/test-gateway');
const Noise = require('noise-handshake');
const Cipher = require('noise-handshake/cipher');
const curve = require('noise-handshake/dh');

// INTEROP_GATEWAY=host:port INTEROP_GATEWAY_KEY=<base64> [INTEROP_GATEWAY_CODE=123456] runs the agent
// tests against that gateway (e.g. the reference gateway in dev mode) instead of lib/test-gateway.js.
const EXTERNAL = process.env.INTEROP_GATEWAY || '';
const CODE = process.env.INTEROP_GATEWAY_CODE || '123456';

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

// ------------------------------------------------------------------ protobuf

/** A value for every field of `type` (recursing into messages), so a round trip checks them all. */
function sample(type, depth = 0) {
  const out = {};
  for (const f of type.fieldsArray) {
    if (f.partOf && f.partOf.name !== `_${f.name}` && f.partOf.oneof[0] !== f.name) continue; // one member per oneof
    const one = () => {
      if (f.resolvedType instanceof proto.protobuf.Enum) return Object.keys(f.resolvedType.values)[1];
      if (f.resolvedType) return depth < 3 ? sample(f.resolvedType, depth + 1) : {};
      switch (f.type) {
        case 'string': return `s-${f.name}-é👋`;
        case 'bytes': return Buffer.from([0, 1, 2, 255]);
        case 'bool': return true;
        case 'double': return 52.5201;
        case 'uint64': return 1767225600123;
        default: return 4711;
      }
    };
    out[f.name] = f.repeated ? [one(), one()] : one();
  }
  return out;
}

function roundTrip(type, obj) {
  const bytes = type.encode(type.fromObject(obj)).finish();
  const back = type.toObject(type.decode(bytes), { longs: Number, enums: String });
  assert.deepEqual(normalize(back), normalize(type.toObject(type.fromObject(obj), { longs: Number, enums: String })));
  return bytes;
}
const normalize = (v) => JSON.parse(JSON.stringify(v, (k, x) => (x && x.type === 'Buffer' ? Buffer.from(x.data).toString('hex') : x)));

for (const f of proto.Stanza.oneofs.body.fieldsArray) {
  test(`protobuf round trip: Stanza.${f.name}`, () => {
    const obj = { id: 42, [f.name]: sample(f.resolvedType) };
    const bytes = proto.encodeStanza(obj);
    const back = proto.decodeStanza(bytes);
    assert.equal(back.body, f.name);
    assert.equal(back.id, 42);
    roundTrip(proto.Stanza, obj);
  });
}
for (const f of proto.root.lookupType('interop.content.v1.DataMessage').oneofs.body.fieldsArray) {
  test(`protobuf round trip: Content.data.${f.name}`, () => {
    const dm = { [f.name]: sample(f.resolvedType), reply_to: { message_id: crypto.randomUUID(), author: '+15550000001' } };
    roundTrip(proto.Content, { data: dm });
    const parsed = content.parseContent(content.encodeDataContent(dm));
    assert.equal(parsed.kind, 'data');
    assert.equal(parsed.json.body, f.name);
  });
}
test('protobuf round trip: Content.sender_key_distribution', () => {
  const parsed = content.parseContent(content.encodeSenderKeyContent('00ff', Buffer.from([1, 2, 3])));
  assert.equal(parsed.kind, 'sender_key_distribution');
  assert.equal(parsed.value.group, '00ff');
  assert.deepEqual([...parsed.value.distribution_message], [1, 2, 3]);
});
test('protobuf: UpdateGroup optional fields keep presence', () => {
  const a = proto.decodeStanza(proto.encodeStanza({ id: 1, update_group: { group: 'g' } }));
  assert.equal('name' in a.update_group, false);
  const b = proto.decodeStanza(proto.encodeStanza({ id: 1, update_group: { group: 'g', name: '' } }));
  assert.equal(b.update_group.name, '');
});
test('protobuf: encodeStanza rejects unknown or missing bodies', () => {
  assert.throws(() => proto.encodeStanza({ id: 1 }));
  assert.throws(() => proto.encodeStanza({ id: 1, sendd: {} }));
  assert.throws(() => proto.encodeStanza({ id: 1, ping: {}, pong: {} }));
});
test('protobuf: client and gateway bodies split at field 40', () => {
  assert.equal(proto.CLIENT_BODIES.size, 19);
  assert.equal(proto.GATEWAY_BODIES.size, 17);
  assert.ok(proto.CLIENT_BODIES.has('blob_put') && proto.GATEWAY_BODIES.has('queue_drained'));
});
test('content: shorthands and code points', () => {
  assert.deepEqual(content.dataMessageFromJson('hi').text.body, 'hi');
  assert.deepEqual(content.dataMessageFromJson({ text: 'yo' }).text.body, 'yo');
  assert.throws(() => content.dataMessageFromJson({ text: 'a', delete: { target: 'x' } }));
  assert.throws(() => content.dataMessageFromJson({ txet: 'a' }));
  assert.equal(content.codePointLength('a👋é'), 3);
  assert.equal(content.codePointSlice('x👋yz', 1, 2), '👋y');
});

// ------------------------------------------------------------------ media

test('media: encrypt/decrypt round trip, sizes', () => {
  for (const n of [0, 1, 15, 16, 17, 1000, 600 * 1024]) {
    const pt = crypto.randomBytes(n);
    const m = content.encryptMedia(pt);
    assert.equal(m.blob.length, 16 + 16 * (Math.floor(n / 16) + 1) + 32);
    assert.equal(m.key.length, 64);
    assert.deepEqual(m.sha256, crypto.createHash('sha256').update(m.blob).digest());
    assert.deepEqual(content.decryptMedia(m.blob, m), pt);
  }
});
test('media: known layout (iv || AES-256-CBC || HMAC-SHA256(iv || ct))', () => {
  const key = Buffer.alloc(64, 7);
  const iv = Buffer.alloc(16, 9);
  const m = content.encryptMedia(Buffer.from('interop'), { key, iv });
  const ct = m.blob.subarray(16, m.blob.length - 32);
  const d = crypto.createDecipheriv('aes-256-cbc', key.subarray(0, 32), iv);
  assert.equal(Buffer.concat([d.update(ct), d.final()]).toString(), 'interop');
  const mac = crypto.createHmac('sha256', key.subarray(32)).update(Buffer.concat([iv, ct])).digest();
  assert.deepEqual(m.blob.subarray(m.blob.length - 32), mac);
});
test('media: tampering is detected (sha256, HMAC, size, key)', () => {
  const m = content.encryptMedia(Buffer.from('hello media'));
  const bad = Buffer.from(m.blob);
  bad[20] ^= 1;
  assert.throws(() => content.decryptMedia(bad, m), /sha256/);
  assert.throws(() => content.decryptMedia(bad, { key: m.key }), /HMAC/);
  assert.throws(() => content.decryptMedia(m.blob, { key: m.key, sha256: m.sha256, size: 3 }), /size/);
  const otherKey = Buffer.from(m.key);
  otherKey[40] ^= 1;
  assert.throws(() => content.decryptMedia(m.blob, { key: otherKey, sha256: m.sha256 }), /HMAC/);
});

// ------------------------------------------------------------------ noise

const VECTOR = {
  m1: 'ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d59',
  m2: 'ac01b2209e86354fb853237b5de0f4fab13c7fcbf433a61c019369617fecf10b8001b4ce4bb2746a6bd693c4d0a900d849389237f160d22856081e810110e359ac9869de9eeb62807da2dd6dd95191b23712d83ca2ba18c52a621be10607aa1e',
  m3: 'ef85c6b0379016c6845ae99f75be21275605d8f34ef8dbd5a2653aa4ef7b87c5b2c9fa00d1f3b0b9dbf0f6299d6e34bef9fb82651f4f19fc438a33d0c8324d31',
  hash: '452a0b6325da01dcb04715b2e10ae1ed33f560723081428ac0851b4f7b69e0cccc997d82d71e39e12fe37d00aeb2eb011ae5dae8b3832bdfadb1222d1b609b9e',
  t1: '022b3e8f012d78a1e6b4a4f3b9f6f98224141420cedc99128f5d223af9',
  t2: '720ebb874efed92c88cfb892b570468d692ee33d1aa81f580d4b25e9',
  t3: 'eb4db9e35eaa2f2cc83e4334dbdcd2cc369d6c08d2ca',
};

test('noise: library speaks Noise_XX_25519_ChaChaPoly_BLAKE2b', () => {
  const n = new Noise('XX', true);
  assert.equal(Buffer.from(n.protocol).toString(), transport.PROTOCOL_NAME);
});
test('noise: known-answer vector (prologue "interop/1", docs §20)', () => {
  const k = (b) => Buffer.alloc(32, b);
  const ini = new Noise('XX', true, curve.generateKeyPair(k(1)));
  const res = new Noise('XX', false, curve.generateKeyPair(k(3)));
  ini.initialise(transport.PROLOGUE);
  res.initialise(transport.PROLOGUE);
  ini.e = curve.generateKeyPair(k(2)); // fixed ephemerals, for the vector only
  res.e = curve.generateKeyPair(k(4));
  const hex = (b) => Buffer.from(b).toString('hex');
  const m1 = hex(ini.send());
  res.recv(Buffer.from(m1, 'hex'));
  const m2 = hex(res.send());
  ini.recv(Buffer.from(m2, 'hex'));
  const m3 = hex(ini.send());
  res.recv(Buffer.from(m3, 'hex'));
  assert.equal(m1, VECTOR.m1);
  assert.equal(m2, VECTOR.m2);
  assert.equal(m3, VECTOR.m3);
  assert.equal(hex(ini.hash), VECTOR.hash);
  assert.equal(hex(res.hash), VECTOR.hash);
  const i2r = new Cipher(ini.tx);
  const r2i = new Cipher(res.tx);
  assert.equal(hex(i2r.encrypt(Buffer.from('hello gateway'))), VECTOR.t1);
  assert.equal(hex(r2i.encrypt(Buffer.from('hello client'))), VECTOR.t2);
  assert.equal(hex(i2r.encrypt(Buffer.from('second'))), VECTOR.t3);
  assert.equal(new Cipher(res.rx).decrypt(Buffer.from(VECTOR.t1, 'hex')).toString(), 'hello gateway');
});
test('framing: 2-byte frames split at arbitrary TCP boundaries', () => {
  const msgs = [Buffer.alloc(1, 1), crypto.randomBytes(300), crypto.randomBytes(65535)];
  const stream = Buffer.concat(msgs.map(transport.encodeFrame));
  const dec = new transport.FrameDecoder();
  const got = [];
  for (let off = 0; off < stream.length;) {
    const n = 1 + Math.floor(Math.random() * 7000);
    got.push(...dec.push(stream.subarray(off, off + n)));
    off += n;
  }
  assert.deepEqual(got.map((b) => Buffer.from(b).toString('hex')), msgs.map((b) => b.toString('hex')));
  assert.throws(() => transport.encodeFrame(Buffer.alloc(65536)));
  assert.throws(() => new transport.FrameDecoder().push(Buffer.from([0, 0])), /zero-length/);
});
test('framing: records span and share transport plaintexts; 1 MiB limit', () => {
  const records = [Buffer.alloc(0), crypto.randomBytes(10), crypto.randomBytes(200000), crypto.randomBytes(transport.MAX_RECORD)];
  const plain = Buffer.concat(records.flatMap((r) => transport.recordToPlaintexts(r)));
  for (const r of records) for (const p of transport.recordToPlaintexts(r)) assert.ok(p.length <= transport.MAX_PLAINTEXT);
  const dec = new transport.RecordDecoder();
  const got = [];
  for (let off = 0; off < plain.length;) {
    const n = Math.min(transport.MAX_PLAINTEXT, 1 + Math.floor(Math.random() * 70000));
    got.push(...dec.push(plain.subarray(off, off + n)));
    off += n;
  }
  assert.equal(got.length, records.length);
  records.forEach((r, i) => assert.ok(r.equals(got[i])));
  const big = Buffer.alloc(4);
  big.writeUInt32BE(transport.MAX_RECORD + 1);
  assert.throws(() => new transport.RecordDecoder().push(big), (e) => e.code === 'TOO_LARGE');
  assert.throws(() => transport.recordToPlaintexts(Buffer.alloc(transport.MAX_RECORD + 1)));
});

async function noisePair({ pinnedKey } = {}) {
  const serverKeys = transport.generateStaticKeyPair();
  let serverSide;
  const accepted = new Promise((resolve) => {
    serverSide = resolve;
  });
  const server = await transport.listen({ staticKeyPair: serverKeys }, (ch) => serverSide(ch));
  const { port } = server.address();
  const clientP = transport.connect({ host: '127.0.0.1', port, serverKey: pinnedKey || Buffer.from(serverKeys.publicKey) });
  return { server, serverKeys, clientP, accepted };
}

test('noise over TCP: handshake, pinning, records both ways', async () => {
  const { server, serverKeys, clientP, accepted } = await noisePair();
  try {
    const client = await clientP;
    const gw = await accepted;
    await gw.handshake();
    assert.ok(client.remoteStatic.equals(Buffer.from(serverKeys.publicKey)));
    assert.ok(client.handshakeHash.equals(gw.handshakeHash));
    const big = crypto.randomBytes(700000);
    const toGw = [];
    const toClient = [];
    const gotAll = new Promise((resolve) => {
      gw.on('record', (r) => {
        toGw.push(Buffer.from(r));
        if (toGw.length === 3) resolve();
      });
    });
    client.sendRecord(proto.encodeStanza({ id: 1, ping: { nonce: 7 } }));
    client.sendRecord(big);
    client.sendRecord(Buffer.alloc(0));
    await gotAll;
    assert.equal(proto.decodeStanza(toGw[0]).ping.nonce, 7);
    assert.ok(toGw[1].equals(big));
    assert.equal(toGw[2].length, 0);
    const back = new Promise((resolve) => client.on('record', (r) => resolve(toClient.push(r))));
    gw.sendRecord(proto.encodeStanza({ id: 1, pong: { nonce: 7 } }));
    await back;
    assert.equal(proto.decodeStanza(toClient[0]).pong.nonce, 7);
    client.close();
  } finally {
    server.close();
  }
});
test('noise over TCP: a wrong pinned key aborts before message 3', async () => {
  const { server, clientP, accepted } = await noisePair({ pinnedKey: crypto.randomBytes(32) });
  try {
    await assert.rejects(clientP, /pinned/);
    const gw = await accepted;
    await assert.rejects(gw.handshake());
  } finally {
    server.close();
  }
});
test('noise over TCP: a tampered transport message closes the connection', async () => {
  const { server, clientP, accepted } = await noisePair();
  try {
    const client = await clientP;
    const gw = await accepted;
    await gw.handshake();
    const closed = new Promise((resolve) => gw.on('close', resolve));
    const frame = transport.encodeFrame(client.sendCipher.encrypt(Buffer.from([0, 0, 0, 1, 0x08])));
    frame[frame.length - 1] ^= 0x80;
    client.socket.write(frame);
    const { reason } = await closed;
    assert.match(reason, /decrypt/);
  } finally {
    server.close();
  }
});
test('noise over TCP: an oversized record length is reported and closes', async () => {
  const { server, clientP, accepted } = await noisePair();
  try {
    const client = await clientP;
    const gw = await accepted;
    await gw.handshake();
    const oversize = new Promise((resolve) => gw.on('oversize', resolve));
    const head = Buffer.alloc(4);
    head.writeUInt32BE(transport.MAX_RECORD + 1);
    client.socket.write(transport.encodeFrame(client.sendCipher.encrypt(head)));
    await oversize;
  } finally {
    server.close();
  }
});

// ------------------------------------------------------------------ the agent, end to end

/** The events one contact reported, and waiting for them. */
class EventLog {
  constructor(name) {
    this.name = name;
    this.events = [];
    this.waiters = [];
  }
  _on(ev) {
    this.events.push(ev);
    for (const w of [...this.waiters]) {
      if (w.pred(ev)) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(ev);
      }
    }
  }
  /** Resolves with the first event (already seen since `from`, or future) matching `pred`. */
  waitFor(pred, { from = 0, timeoutMs = 10000 } = {}) {
    const seen = this.events.slice(from).find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const w = { pred, resolve };
      this.waiters.push(w);
      setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) {
          this.waiters.splice(i, 1);
          reject(new Error(`${this.name}: no matching event within ${timeoutMs} ms; events: ${JSON.stringify(this.events.slice(-5))}`));
        }
      }, timeoutMs).unref();
    });
  }
  mark() {
    return this.events.length;
  }
}

/** A contact in this process (current libsignal). */
class Probe extends EventLog {
  constructor(name) {
    super(name);
    this.contact = new Contact({ emit: (ev) => this._on(ev) });
  }
}

let gw;
const people = {};
async function person(name, account) {
  const p = new Probe(name);
  await p.contact.connect({ host: gw.host, port: gw.port, server_key: gw.publicKey });
  await p.contact.register({ account, code: CODE });
  await p.contact.login({});
  await p.contact.upload_keys({ one_time: 12, kyber: 12 });
  people[name] = p;
  return p;
}
// Accounts are fresh per run, so the tests can also run against a gateway that keeps its data.
const RUN = String(crypto.randomInt(1e6)).padStart(6, '0');
const acct = (n) => `+49${RUN}${String(n).padStart(3, '0')}`;
const ALICE = acct(1);
const BOB = acct(2);
const CAROL = acct(3);

test('agent: start the in-process gateway and three contacts', async () => {
  if (EXTERNAL) {
    const m = /^(.*):(\d+)$/.exec(EXTERNAL);
    gw = { host: m[1], port: Number(m[2]), publicKey: process.env.INTEROP_GATEWAY_KEY, stop: async () => {} };
    assert.ok(gw.publicKey, 'INTEROP_GATEWAY_KEY (base64) is needed with INTEROP_GATEWAY');
  } else {
    gw = await new TestGateway({ code: CODE }).start();
    gw.host = '127.0.0.1';
  }
  await person('alice', ALICE);
  await person('bob', BOB);
  await person('carol', CAROL);
  assert.deepEqual(await people.alice.contact.key_counts(), { one_time_prekeys: 12, kyber_prekeys: 12 });
});
test('agent: first message starts a PQXDH session; delivery receipt comes back', async () => {
  const { alice, bob } = people;
  const m = bob.mark();
  const sent = await alice.contact.send({ to: BOB, content: { text: { body: 'Hi Bob 👋', formats: [{ style: 'BOLD', start: 3, length: 3 }] } } });
  assert.equal(sent.kind, 'PREKEY');
  assert.equal(sent.new_session, true);
  assert.equal(sent.pqxdh, true);
  assert.equal(sent.message_version, 4);
  assert.equal(sent.recipients, 1);
  const ev = await bob.waitFor((e) => e.event === 'message', { from: m });
  assert.equal(ev.from, ALICE);
  assert.equal(ev.message_id, sent.message_id);
  assert.equal(ev.content.text.body, 'Hi Bob 👋');
  assert.equal(ev.content.text.formats[0].style, 'BOLD');
  const r = await alice.waitFor((e) => e.event === 'receipt' && e.message_ids.includes(sent.message_id));
  assert.equal(r.type, 'DELIVERED');
  assert.equal(r.from, BOB);
});
test('agent: replies ratchet (MESSAGE kind, SPQR reported), reply_to and reactions carry ids', async () => {
  const { alice, bob } = people;
  const first = alice.events.find((e) => e.event === 'receipt').message_ids[0];
  const m = alice.mark();
  const sent = await bob.contact.send({ to: ALICE, content: { text: 'Hello Alice', reply_to: { message_id: first, author: ALICE } } });
  assert.equal(sent.kind, 'MESSAGE');
  assert.equal(sent.spqr, true, 'libsignal 0.103 negotiates SPQR between two of its own');
  assert.ok(sent.pq_ratchet_bytes > 0);
  const ev = await alice.waitFor((e) => e.event === 'message', { from: m });
  assert.equal(ev.kind, 'MESSAGE');
  assert.equal(ev.content.reply_to.message_id, first);
  const m2 = bob.mark();
  await alice.contact.send({ to: BOB, content: { reaction: { target: sent.message_id, emoji: '❤️', target_author: BOB } } });
  const re = await bob.waitFor((e) => e.event === 'message' && e.content.reaction, { from: m2 });
  assert.equal(re.content.reaction.emoji, '❤️');
});
test('agent: receipts, typing and presence', async () => {
  const { alice, bob } = people;
  const m = alice.mark();
  await bob.contact.receipt({ to: ALICE, type: 'READ', message_ids: ['x-1', 'x-2'] });
  const r = await alice.waitFor((e) => e.event === 'receipt' && e.type === 'READ', { from: m });
  assert.deepEqual(r.message_ids, ['x-1', 'x-2']);
  await bob.contact.typing({ to: ALICE, typing: true });
  const t = await alice.waitFor((e) => e.event === 'typing', { from: m });
  assert.deepEqual([t.from, t.typing], [BOB, true]);
  await bob.contact.presence({ online: true });
  const p = await alice.waitFor((e) => e.event === 'presence', { from: m });
  assert.deepEqual([p.account, p.online], [BOB, true]);
});
test('agent: media upload (multi-chunk), send, download with checks', async () => {
  const { alice, bob } = people;
  const bytes = crypto.randomBytes(1300 * 1024);
  const up = await alice.contact.upload_media({ bytes_b64: bytes.toString('base64'), mimetype: 'image/png', filename: 'cat.png', width: 640, height: 480 });
  assert.equal(up.media.type, 'IMAGE');
  assert.equal(up.media.size, bytes.length);
  const m = bob.mark();
  await alice.contact.send({ to: BOB, content: { media: { ...up.media, caption: { body: 'a cat' } } } });
  const ev = await bob.waitFor((e) => e.event === 'message' && e.content.media, { from: m });
  assert.equal(ev.content.media.filename, 'cat.png');
  const got = await bob.contact.download_media({ media: ev.content.media });
  assert.ok(Buffer.from(got.bytes_b64, 'base64').equals(bytes));
  const tampered = { ...ev.content.media, key: Buffer.alloc(64, 1).toString('base64') };
  await assert.rejects(bob.contact.download_media({ media: tampered }), /HMAC/);
});
test('agent: groups with sender keys; removal rotates the distribution id', async () => {
  const { alice, bob, carol } = people;
  const mb = bob.mark();
  const mc = carol.mark();
  const { group } = await alice.contact.create_group({ name: 'Trio', members: [BOB, CAROL] });
  assert.deepEqual(new Set(group.members), new Set([ALICE, BOB, CAROL]));
  await bob.waitFor((e) => e.event === 'group_update' && e.group.id === group.id, { from: mb });
  await carol.waitFor((e) => e.event === 'group_update' && e.group.id === group.id, { from: mc });
  const s1 = await alice.contact.send_group({ group: group.id, content: 'hello group' });
  assert.deepEqual(new Set(s1.distributed_to), new Set([BOB, CAROL]));
  assert.equal(s1.recipients, 2);
  for (const p of [bob, carol]) {
    const ev = await p.waitFor((e) => e.event === 'message' && e.kind === 'GROUP', { from: p === bob ? mb : mc });
    assert.equal(ev.group, group.id);
    assert.equal(ev.content.text.body, 'hello group');
  }
  const s2 = await alice.contact.send_group({ group: group.id, content: 'again' });
  assert.equal(s2.distribution_id, s1.distribution_id);
  assert.deepEqual(s2.distributed_to, []);
  // carol (who has a session with nobody yet) answers in the group too
  const ma = alice.mark();
  await carol.contact.send_group({ group: group.id, content: 'hi from carol' });
  const fromCarol = await alice.waitFor((e) => e.event === 'message' && e.from === CAROL && e.kind === 'GROUP', { from: ma });
  assert.equal(fromCarol.content.text.body, 'hi from carol');
  // remove carol: alice's next group message uses a new sender key, carol gets it no more
  const mc2 = carol.mark();
  await alice.contact.update_group({ group: group.id, remove: [CAROL], name: 'Duo' });
  const upd = await carol.waitFor((e) => e.event === 'group_update', { from: mc2 });
  assert.equal(upd.group.members.includes(CAROL), false);
  const s3 = await alice.contact.send_group({ group: group.id, content: 'without carol' });
  assert.notEqual(s3.distribution_id, s1.distribution_id);
  assert.deepEqual(s3.distributed_to, [BOB]);
  await bob.waitFor((e) => e.event === 'message' && e.content.text && e.content.text.body === 'without carol');
  await assert.rejects(carol.contact.send_group({ group: group.id, content: 'let me in' }), (e) => e.code === 'NOT_MEMBER');
});
test('agent: unacked envelopes are redelivered after the next login', async () => {
  const { alice, bob } = people;
  bob.contact.hold_acks({ on: true });
  const m = bob.mark();
  const sent = await alice.contact.send({ to: BOB, content: 'are you there?' });
  await bob.waitFor((e) => e.event === 'message' && e.message_id === sent.message_id, { from: m });
  await bob.contact.disconnect();
  bob.contact.hold_acks({ on: false });
  await bob.contact.connect({ host: gw.host, port: gw.port, server_key: gw.publicKey });
  const m2 = bob.mark();
  const li = await bob.contact.login({});
  assert.ok(li.queued >= 1);
  const again = await bob.waitFor((e) => e.event === 'message' && e.message_id === sent.message_id, { from: m2 });
  assert.equal(again.redelivered, true);
  await bob.waitFor((e) => e.event === 'queue_drained', { from: m2 });
  await bob.contact.drain();
});
test('agent: identity reset is noticed by the peer (trust on first use, then notice)', async () => {
  const { alice, bob } = people;
  const reset = await bob.contact.reset_identity({});
  assert.notEqual(reset.identity_key, reset.old_identity_key);
  const m = alice.mark();
  const sent = await bob.contact.send({ to: ALICE, content: 'new phone, who dis' });
  assert.equal(sent.kind, 'PREKEY');
  const ch = await alice.waitFor((e) => e.event === 'identity_change' && e.account === BOB, { from: m });
  assert.equal(ch.new_identity_key, reset.identity_key);
  const msg = await alice.waitFor((e) => e.event === 'message' && e.message_id === sent.message_id, { from: m });
  assert.equal(msg.content.text.body, 'new phone, who dis');
  // and alice can answer in the new session
  const mb = bob.mark();
  await alice.contact.send({ to: BOB, content: 'welcome back' });
  await bob.waitFor((e) => e.event === 'message' && e.content.text && e.content.text.body === 'welcome back', { from: mb });
});
test('agent: prekeys run low after fetches; a second login gets CONFLICT', async () => {
  const { alice, carol } = people;
  // carol has sessions with alice already; fresh contacts fetch carol's bundle until the keys run low
  const m = carol.mark();
  for (let i = 0; i < 3; i++) {
    const p = await person(`extra${i}`, acct(100 + i));
    await p.contact.send({ to: CAROL, content: `hi ${i}` });
  }
  const low = await carol.waitFor((e) => e.event === 'prekeys_low', { from: m });
  assert.ok(low.one_time_prekeys < 10);
  const twin = new Probe('alice-twin');
  await twin.contact.connect({ host: gw.host, port: gw.port, server_key: gw.publicKey });
  const ma = alice.mark();
  await twin.contact.login({ account: ALICE, secret: alice.contact.save().secret });
  const err = await alice.waitFor((e) => e.event === 'gateway_error', { from: ma });
  assert.equal(err.code, 'CONFLICT');
  await alice.waitFor((e) => e.event === 'disconnected', { from: ma });
  await twin.contact.disconnect();
});
test('agent: gateway errors surface with their codes', async () => {
  const { bob } = people;
  await assert.rejects(bob.contact.send({ to: acct(999), content: 'nobody' }), (e) => e.code === 'NOT_FOUND');
  await assert.rejects(bob.contact.send({ to: 'bob', content: 'x' }), (e) => e.code === 'BAD_REQUEST');
  const p = new Probe('stranger');
  await p.contact.connect({ host: gw.host, port: gw.port, server_key: gw.publicKey });
  await assert.rejects(p.contact.register({ account: acct(9), code: CODE === '000000' ? '000001' : '000000' }), (e) => e.code === 'BAD_CODE');
  await p.contact.disconnect();
});

test('cli: contact.js over JSON lines', async () => {
  const child = spawn(process.execPath, [path.join(__dirname, 'contact.js')], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = readline.createInterface({ input: child.stdout });
  const replies = [];
  const events = [];
  let wake = () => {};
  lines.on('line', (l) => {
    const o = JSON.parse(l);
    (o.event ? events : replies).push(o);
    wake();
  });
  const until = async (cond, what) => {
    const deadline = Date.now() + 15000;
    for (;;) {
      const v = cond();
      if (v) return v;
      if (Date.now() > deadline) throw new Error(`cli: timed out waiting for ${what}`);
      await new Promise((r) => {
        wake = r;
        setTimeout(r, 200);
      });
    }
  };
  const cmd = async (obj) => {
    const n = replies.length;
    child.stdin.write(`${JSON.stringify(obj)}\n`);
    const r = await until(() => replies[n], obj.cmd);
    return r;
  };
  try {
    assert.equal((await cmd({ cmd: 'connect', host: gw.host, port: gw.port, server_key: gw.publicKey })).ok, true);
    assert.equal((await cmd({ cmd: 'register', account: acct(200), code: CODE, req: 'r1' })).req, 'r1');
    const li = await cmd({ cmd: 'login' });
    assert.equal(li.account, acct(200));
    const up = await cmd({ cmd: 'upload_keys', one_time: 5, kyber: 5 });
    assert.equal(up.one_time_prekeys, 5);
    const bad = await cmd({ cmd: 'nonsense' });
    assert.equal(bad.ok, false);
    // alice was logged out by the conflict test above: log her in again to receive it
    if (!people.alice.contact.status().logged_in) {
      await people.alice.contact.connect({ host: gw.host, port: gw.port, server_key: gw.publicKey });
      await people.alice.contact.login({});
    }
    const sent = await cmd({ cmd: 'send', to: ALICE, content: { text: { body: 'from the cli' } } });
    assert.equal(sent.ok, true, JSON.stringify(sent));
    assert.equal(sent.kind, 'PREKEY');
    await people.alice.waitFor((e) => e.event === 'message' && e.message_id === sent.message_id);
    await until(() => events.find((e) => e.event === 'receipt' && e.message_ids.includes(sent.message_id)), 'delivery receipt event');
    assert.equal((await cmd({ cmd: 'quit' })).ok, true);
    await new Promise((r) => child.once('exit', r));
  } finally {
    child.kill();
  }
});

function startDemo(account, extra = []) {
  const child = spawn(process.execPath, [path.join(__dirname, 'demo-contact.js'), '--account', account, '--gateway', `${gw.host}:${gw.port}`, '--server-key', gw.publicKey, '--code', CODE, '--name', 'Echo', ...extra], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = readline.createInterface({ input: child.stdout });
  const ready = new Promise((resolve, reject) => {
    lines.on('line', (l) => {
      const ev = JSON.parse(l);
      if (ev.event === 'ready') resolve(ev);
    });
    child.once('exit', (code) => reject(new Error(`demo exited with ${code}`)));
  });
  const stopped = new Promise((resolve) => child.once('exit', resolve));
  return { child, ready, stop: () => (child.kill('SIGTERM'), stopped) };
}

test('demo: demo-contact.js answers texts with a reply, a reaction and a read receipt', async () => {
  const DEMO = acct(300);
  const demo = startDemo(DEMO);
  try {
    await demo.ready;
    const { bob } = people;
    const m = bob.mark();
    const sent = await bob.contact.send({ to: DEMO, content: 'ping demo' });
    const reply = await bob.waitFor((e) => e.event === 'message' && e.from === DEMO && e.content.text, { from: m });
    assert.equal(reply.content.text.body, 'You said: ping demo');
    assert.equal(reply.content.reply_to.message_id, sent.message_id);
    const reaction = await bob.waitFor((e) => e.event === 'message' && e.from === DEMO && e.content.reaction, { from: m });
    assert.equal(reaction.content.reaction.target, sent.message_id);
    await bob.waitFor((e) => e.event === 'receipt' && e.type === 'READ' && e.message_ids.includes(sent.message_id), { from: m });
    const profile = await bob.contact.get_profile({ account: DEMO });
    assert.equal(profile.profile.name, 'Echo');
  } finally {
    await demo.stop();
  }
});

test('demo: with --state it keeps its identity and sessions across a restart', async () => {
  const DEMO = acct(301);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'demo-contact-'));
  const state = path.join(dir, 'state.json');
  try {
    const first = startDemo(DEMO, ['--state', state]);
    let r1;
    let m;
    const { bob } = people;
    try {
      r1 = await first.ready;
      m = bob.mark();
      await bob.contact.send({ to: DEMO, content: 'before restart' });
      await bob.waitFor((e) => e.event === 'message' && e.from === DEMO && e.content.text, { from: m });
    } finally {
      await first.stop();
    }
    const second = startDemo(DEMO, ['--state', state]);
    try {
      const r2 = await second.ready;
      assert.equal(r2.identity_key, r1.identity_key);
      m = bob.mark();
      const sent = await bob.contact.send({ to: DEMO, content: 'after restart' });
      assert.equal(sent.kind, 'MESSAGE');
      const reply = await bob.waitFor((e) => e.event === 'message' && e.from === DEMO && e.content.text, { from: m });
      assert.equal(reply.content.text.body, 'You said: after restart');
      assert.equal(bob.events.slice(m).some((e) => e.event === 'identity_change'), false);
    } finally {
      await second.stop();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// ------------------------------------------------------------------ libsignal 0.72.1 (X3DH-era contacts)

/** A contact.js child process, so that it can load another libsignal (MIB_CONTACT_LIBSIGNAL). */
class ChildContact extends EventLog {
  constructor(name, libsignal) {
    super(name);
    this.stderr = '';
    this.replies = []; // resolvers, one per command in flight (replies come in order)
    this.child = spawn(process.execPath, [path.join(__dirname, 'contact.js')], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, MIB_CONTACT_LIBSIGNAL: libsignal },
    });
    this.child.stderr.on('data', (d) => {
      this.stderr += d;
    });
    readline.createInterface({ input: this.child.stdout }).on('line', (line) => {
      const o = JSON.parse(line);
      if (o.event) this._on(o);
      else if (this.replies.length) this.replies.shift()(o);
    });
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code) => {
        for (const r of this.replies.splice(0)) r({ ok: false, error: `${name} exited with ${code}: ${this.stderr.trim()}` });
        resolve(code);
      });
    });
    children.push(this);
  }
  /** Runs one command; resolves with its reply, rejects with an Error (and `code`) for {"ok": false}. */
  cmd(cmd, args = {}) {
    return new Promise((resolve, reject) => {
      this.replies.push((r) => (r.ok ? resolve(r) : reject(Object.assign(new Error(r.error), { code: r.code }))));
      this.child.stdin.write(`${JSON.stringify({ cmd, ...args })}\n`);
    });
  }
  async quit() {
    if (this.child.exitCode === null) await this.cmd('quit').catch(() => {});
    return this.exited;
  }
}
const children = [];

/** A registered, logged-in child contact with keys uploaded; `kyber: false` makes it an X3DH-era client first. */
async function childPerson(name, account, { libsignal = 'x3dh', kyber = true } = {}) {
  const p = new ChildContact(name, libsignal);
  await p.cmd('connect', { host: gw.host, port: gw.port, server_key: gw.publicKey });
  if (!kyber) assert.deepEqual(await p.cmd('set_kyber', { enabled: false }), { ok: true, kyber: false, uploaded: false });
  await p.cmd('register', { account, code: CODE });
  await p.cmd('login');
  const up = await p.cmd('upload_keys', { one_time: 10, kyber: 10 });
  assert.equal(up.one_time_prekeys, 10);
  assert.equal(up.kyber_prekeys, kyber ? 10 : 0);
  people[name] = p;
  return p;
}

/** `sender` sends the text `body` to the account `to` (the `receiver`); returns the send reply and the receiver's message event. */
async function say(sender, receiver, to, body) {
  const m = receiver.mark();
  const sent = sender instanceof ChildContact ? await sender.cmd('send', { to, content: body }) : await sender.contact.send({ to, content: body });
  const got = await receiver.waitFor((e) => e.event === 'message' && e.message_id === sent.message_id, { from: m });
  assert.equal(got.content.text.body, body);
  return { sent, got };
}

const DAVE = acct(400);
const ERIN = acct(401);
const FRANK = acct(402);

test('x3dh: MIB_CONTACT_LIBSIGNAL picks the library; unknown values stop contact.js at start', async () => {
  const bad = new ChildContact('bad', 'x3dhh');
  assert.equal(await bad.exited, 2);
  assert.match(bad.stderr, /MIB_CONTACT_LIBSIGNAL="x3dhh" is not known/);
  const st = people.alice.contact.status();
  assert.equal(st.libsignal_version, '0.103.0');
  assert.equal(st.kyber, true);
  await assert.rejects(people.alice.contact.set_kyber({ enabled: false }), /needs MIB_CONTACT_LIBSIGNAL=x3dh.*cannot do X3DH/);
  assert.deepEqual(await people.alice.contact.set_kyber({ enabled: true }), { kyber: true, uploaded: false });
  const old = new ChildContact('old', 'x3dh');
  try {
    const s = await old.cmd('status');
    assert.equal(s.libsignal_version, '0.72.1');
    assert.equal(s.kyber, true);
  } finally {
    await old.quit();
  }
});

test('x3dh: two X3DH-era contacts (0.72.1, Kyber off) start an X3DH session and chat both ways', async () => {
  const dave = await childPerson('dave', DAVE, { kyber: false });
  const erin = await childPerson('erin', ERIN, { kyber: false });
  assert.equal((await dave.cmd('status')).kyber, false);
  await erin.cmd('auto_replenish', { count: 5 });
  const me = erin.mark();
  const first = await say(dave, erin, ERIN, 'hello over X3DH');
  // dave's fetch left erin 9 one-time prekeys: she replenishes, without Kyber keys
  const low = await erin.waitFor((e) => e.event === 'prekeys_low', { from: me });
  assert.deepEqual([low.one_time_prekeys, low.kyber_prekeys], [9, 0]);
  const refilled = await erin.waitFor((e) => e.event === 'keys_replenished', { from: me });
  assert.deepEqual([refilled.one_time_prekeys, refilled.kyber_prekeys], [14, 0]);
  await erin.cmd('auto_replenish', { count: 0 });
  assert.equal(first.sent.kind, 'PREKEY');
  assert.equal(first.sent.new_session, true);
  assert.equal(first.sent.message_version, 3);
  assert.equal(first.sent.pqxdh, false);
  assert.equal(first.sent.kyber_ciphertext_bytes, 0);
  assert.equal(first.sent.spqr, false);
  assert.deepEqual([first.got.kind, first.got.message_version, first.got.pqxdh, first.got.spqr], ['PREKEY', 3, false, false]);
  const reply = await say(erin, dave, DAVE, 'and back');
  assert.deepEqual([reply.sent.kind, reply.sent.message_version, reply.sent.spqr], ['MESSAGE', 3, false]);
  assert.deepEqual([reply.got.kind, reply.got.message_version], ['MESSAGE', 3]);
  const again = await say(dave, erin, ERIN, 'ratcheting on');
  assert.deepEqual([again.sent.kind, again.sent.message_version], ['MESSAGE', 3]);
  // the current library cannot start a session with an account that has no Kyber prekey
  await assert.rejects(people.bob.contact.send({ to: DAVE, content: 'pq only' }), /published no Kyber prekey.*0\.103\.0 starts PQXDH sessions only/);
  // reset_identity of an X3DH-era contact uploads no Kyber keys either; its next session is X3DH again
  const reset = await erin.cmd('reset_identity', {});
  assert.equal(reset.kyber_prekeys, 0);
  const m = dave.mark();
  const fresh = await say(erin, dave, DAVE, 'new phone, still X3DH');
  assert.deepEqual([fresh.sent.kind, fresh.sent.message_version, fresh.sent.pqxdh], ['PREKEY', 3, false]);
  await dave.waitFor((e) => e.event === 'identity_change' && e.account === ERIN, { from: m });
});

test('x3dh: an X3DH-era contact turns Kyber on; new sessions with it are PQXDH, the old one goes on', async () => {
  const { dave, erin } = people;
  const on = await dave.cmd('set_kyber', { enabled: true, kyber: 7 });
  assert.deepEqual([on.kyber, on.uploaded, on.kyber_prekeys], [true, true, 7]);
  assert.equal((await dave.cmd('status')).kyber, true);
  assert.equal((await dave.cmd('set_kyber', { enabled: true })).uploaded, false, 'already on: nothing uploaded');
  // a new 0.72.1 peer (Kyber on) starts a PQXDH session with it (0.72.1 has no SPQR)
  const frank = await childPerson('frank', FRANK);
  const pq = await say(frank, dave, DAVE, 'now with Kyber');
  assert.deepEqual([pq.sent.kind, pq.sent.message_version, pq.sent.pqxdh, pq.sent.spqr], ['PREKEY', 4, true, false]);
  assert.equal(pq.sent.kyber_ciphertext_bytes, 1569);
  assert.deepEqual([pq.got.kind, pq.got.message_version, pq.got.pqxdh], ['PREKEY', 4, true]);
  assert.equal((await dave.cmd('key_counts')).kyber_prekeys, 6);
  const back = await say(dave, frank, FRANK, 'PQXDH answer');
  assert.deepEqual([back.sent.kind, back.sent.message_version], ['MESSAGE', 4]);
  await say(frank, dave, DAVE, 'and on');
  // the X3DH session with erin is kept
  const old = await say(dave, erin, ERIN, 'still our old session');
  assert.deepEqual([old.sent.kind, old.sent.message_version], ['MESSAGE', 3]);
  await say(erin, dave, DAVE, 'yes');
});

test('x3dh: sender keys on 0.72.1 (a group over X3DH and PQXDH sessions)', async () => {
  const { dave, erin, frank } = people;
  const me = erin.mark();
  const mf = frank.mark();
  const { group } = await dave.cmd('create_group', { name: 'Old clients', members: [ERIN, FRANK] });
  await erin.waitFor((e) => e.event === 'group_update' && e.group.id === group.id, { from: me });
  const s1 = await dave.cmd('send_group', { group: group.id, content: 'hello group' });
  assert.deepEqual(new Set(s1.distributed_to), new Set([ERIN, FRANK]));
  for (const [p, from] of [[erin, me], [frank, mf]]) {
    await p.waitFor((e) => e.event === 'sender_key' && e.group === group.id, { from });
    const ev = await p.waitFor((e) => e.event === 'message' && e.kind === 'GROUP' && e.from === DAVE, { from });
    assert.equal(ev.content.text.body, 'hello group');
  }
  const md = dave.mark();
  await erin.cmd('send_group', { group: group.id, content: 'erin too' });
  assert.equal((await dave.waitFor((e) => e.event === 'message' && e.kind === 'GROUP' && e.from === ERIN, { from: md })).content.text.body, 'erin too');
});

// libsignal 0.103.0 requires SPQR, which 0.72.1 does not have: a 0.103.0 contact rejects a 0.72.1
// session start ("post-quantum ratchet error: Minimum version" in libsignal's log), and 0.72.1 fails
// the MAC of a 0.103.0 session start. The two official versions cannot talk to each other at all.
test('x3dh: 0.103.0 and 0.72.1 (Kyber on) contacts cannot start a session with each other (SPQR)', async () => {
  const { bob, frank } = people;
  const mb = bob.mark();
  const up = await frank.cmd('send', { to: BOB, content: 'from 0.72.1' });
  assert.deepEqual([up.kind, up.message_version, up.pqxdh, up.spqr], ['PREKEY', 4, true, false]);
  const e1 = await bob.waitFor((e) => e.event === 'decrypt_error' && e.message_id === up.message_id, { from: mb });
  assert.match(e1.error, /invalid PreKey message/);
  const mf = frank.mark();
  const down = await bob.contact.send({ to: FRANK, content: 'from 0.103.0' });
  assert.deepEqual([down.kind, down.message_version, down.pqxdh, down.spqr], ['PREKEY', 4, true, true]);
  const e2 = await frank.waitFor((e) => e.event === 'decrypt_error' && e.message_id === down.message_id, { from: mf });
  assert.match(e2.error, /invalid PreKey message/);
});

// ------------------------------------------------------------------ runner

(async () => {
  let passed = 0;
  let failed = 0;
  for (const t of tests) {
    const started = Date.now();
    try {
      await t.fn();
      passed++;
      console.log(`ok   ${t.name} (${Date.now() - started} ms)`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${t.name}\n     ${(e && e.stack ? e.stack : String(e)).split('\n').slice(0, 6).join('\n     ')}`);
    }
  }
  for (const c of children) await c.quit();
  for (const p of Object.values(people)) if (p.contact) await p.contact.disconnect().catch(() => {});
  if (gw) await gw.stop().catch(() => {});
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})();
