#!/usr/bin/env node
// Self-test of js_e2ee_client.js (matrix-js-sdk, Rust crypto) against a real, throwaway Synapse.
//
//   node tests/peers/js_e2ee_selftest.js [--keep] [--verbose]
//
// Synapse comes from the venv named by MIB_SYNAPSE_VENV (scripts/ensure-synapse.sh makes it; without
// the variable the scripts below call ensure-synapse.sh themselves). Starts Synapse on a free loopback
// port in a temporary directory (scripts/synapse-config.sh and scripts/start-synapse.sh, with a dummy
// appservice registration), registers four users and drives four clients:
//
//   alice  exclude_insecure (OnlySignedDevicesIsolationMode), cross-signed
//   bob    exclude_insecure, cross-signed
//   carol  cross_sign: false: her device is not cross-signed by her (she has no cross-signing identity)
//   dave   all_devices (AllDevicesIsolationMode), cross-signed
//
// It checks an encrypted DM between alice and bob (text, an encrypted image, a reaction and a reply,
// decrypted both ways with shield NONE although neither has verified the other), the keys_query view,
// that alice refuses carol's event (undecryptable, with the failure code) while dave decrypts it (with
// the shield matrix-js-sdk gives it), that alice shares no room key with carol's device, and the
// JSON-lines protocol itself.
//
// Prints one line per check ("ok"/"FAIL"), "note" lines with what matrix-js-sdk reported, timings,
// then "N passed, M failed"; exits non-zero on any failure. Synapse and the clients are stopped in every
// case; the temporary directory is removed on success (kept on failure or with --keep).
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');
const readline = require('readline');
const { spawn, spawnSync } = require('child_process');

const HERE = __dirname;
const REPO = path.resolve(HERE, '..', '..');
const CLIENT = path.join(HERE, 'js_e2ee_client.js');
const SERVER = 'localhost';
const KEEP = process.argv.includes('--keep');
const VERBOSE = process.argv.includes('--verbose');

class Failed extends Error {}

// ----- results ------------------------------------------------------------------------------------

const results = { passed: 0, failed: 0 };

function check(name, ok, detail = '') {
  if (ok) {
    results.passed += 1;
    console.log(`  ok    ${name}`);
  } else {
    results.failed += 1;
    console.log(`  FAIL  ${name}${detail ? `: ${detail}` : ''}`);
  }
  return ok;
}

function must(name, ok, detail = '') {
  if (!check(name, ok, detail)) throw new Failed(name);
}

function note(text) {
  console.log(`  note  ${text}`);
}

async function timed(name, fn) {
  const t0 = Date.now();
  try {
    return await fn();
  } finally {
    console.log(`  time  ${name}: ${((Date.now() - t0) / 1000).toFixed(2)} s`);
  }
}

// ----- Synapse ------------------------------------------------------------------------------------

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

class Synapse {
  constructor(workdir) {
    this.workdir = workdir;
    this.dir = path.join(workdir, 'hs');
    this.proc = null;
    this.env = { ...process.env };
  }

  async writeRegistration() {
    // A dummy appservice (Synapse's test config loads one): its URL is a closed port, and no user of
    // this test is in its namespace, so Synapse never needs to reach it.
    const file = path.join(this.workdir, 'registration.yaml');
    fs.writeFileSync(file, [
      'id: js-e2ee-selftest',
      `url: http://127.0.0.1:${await freePort()}`,
      `as_token: ${crypto.randomBytes(16).toString('hex')}`,
      `hs_token: ${crypto.randomBytes(16).toString('hex')}`,
      'sender_localpart: selftest_bridge_bot',
      'rate_limited: false',
      'namespaces:',
      '  users:',
      "    - regex: '@selftest_bridge_.*:localhost'",
      '      exclusive: true',
      '  aliases: []',
      '  rooms: []',
      '',
    ].join('\n'));
    return file;
  }

  async start(timeoutS = 120) {
    this.port = await freePort();
    this.url = `http://127.0.0.1:${this.port}`;
    const registration = await this.writeRegistration();
    const out = spawnSync('bash', [path.join(REPO, 'scripts/synapse-config.sh'), this.dir, String(this.port), registration, SERVER],
      { env: this.env, encoding: 'utf8' });
    if (out.status !== 0) throw new Failed(`synapse-config.sh failed: ${(out.stderr || '').trim()}`);
    const values = Object.fromEntries(out.stdout.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    this.sharedSecret = values.shared_secret;
    const log = fs.openSync(path.join(this.workdir, 'synapse.out'), 'w');
    // start-synapse.sh execs Synapse: the child is Synapse itself.
    this.proc = spawn('bash', [path.join(REPO, 'scripts/start-synapse.sh'), this.dir], { env: this.env, stdio: ['ignore', log, log] });
    fs.closeSync(log);
    const exited = new Promise((resolve) => this.proc.once('exit', (code) => resolve(code)));
    this.exitedEarly = null;
    exited.then((code) => { this.exitedEarly = code; });
    const deadline = Date.now() + timeoutS * 1000;
    while (Date.now() < deadline) {
      if (this.exitedEarly !== null) throw new Failed(`Synapse exited with ${this.exitedEarly}; see ${path.join(this.workdir, 'synapse.out')}`);
      try {
        const resp = await fetch(`${this.url}/_matrix/client/versions`, { signal: AbortSignal.timeout(2000) });
        if (resp.status === 200) return;
      } catch (_) {
        // not up yet
      }
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Failed(`Synapse did not answer within ${timeoutS} s`);
  }

  register(localpart, password) {
    const out = spawnSync('bash', [path.join(REPO, 'scripts/register-user.sh'), this.url, this.sharedSecret, localpart, password],
      { env: this.env, encoding: 'utf8' });
    if (out.status !== 0) throw new Failed(`register-user.sh ${localpart}: ${(out.stderr || '').trim()}`);
    return out.stdout.trim();
  }

  async stop() {
    const proc = this.proc;
    this.proc = null;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const gone = new Promise((resolve) => proc.once('exit', resolve));
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 20000);
    await gone;
    clearTimeout(timer);
  }
}

// ----- clients --------------------------------------------------------------------------------------

class Peer {
  constructor(name, logdir) {
    this.name = name;
    this.logdir = logdir;
    this.proc = null;
    this.nextReq = 0;
    this.waiting = new Map();
    this.events = [];
    this.stray = [];
    this.replies = 0;
    this.exitCode = null;
  }

  start() {
    const stderr = fs.openSync(path.join(this.logdir, `${this.name}.stderr`), 'w');
    const args = [CLIENT, '--sync-timeout', '5000', ...(VERBOSE ? ['--verbose'] : [])];
    this.proc = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', stderr] });
    fs.closeSync(stderr);
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => {
      this.exitCode = code === null ? signal : code;
      for (const { reject } of this.waiting.values()) reject(new Failed(`${this.name}: client exited`));
      this.waiting.clear();
      resolve();
    }));
    const rl = readline.createInterface({ input: this.proc.stdout, crlfDelay: Infinity });
    rl.on('line', (line) => {
      let msg;
      try {
        msg = JSON.parse(line);
      } catch (_) {
        this.stray.push(line);
        return;
      }
      if (msg && typeof msg === 'object' && 'event' in msg && !('ok' in msg)) {
        this.events.push(msg);
      } else if (msg && typeof msg === 'object' && 'ok' in msg && this.waiting.has(msg.req)) {
        this.replies += 1;
        const { resolve } = this.waiting.get(msg.req);
        this.waiting.delete(msg.req);
        resolve(msg);
      } else {
        this.stray.push(line);
      }
    });
  }

  /** Send one command; the reply, whatever its "ok". */
  raw(cmd, args = {}, replyWithinS = 60) {
    this.nextReq += 1;
    const req = this.nextReq;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(req);
        reject(new Failed(`${this.name} ${cmd}: no reply within ${replyWithinS} s`));
      }, replyWithinS * 1000);
      this.waiting.set(req, {
        resolve: (m) => { clearTimeout(timer); resolve(m); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      this.proc.stdin.write(`${JSON.stringify({ cmd, req, ...args })}\n`);
    });
  }

  /** Like raw(), but a reply with "ok": false throws. */
  async call(cmd, args = {}, replyWithinS = 60) {
    const reply = await this.raw(cmd, args, replyWithinS);
    if (!reply.ok) throw new Failed(`${this.name} ${cmd}: ${reply.error}`);
    return reply;
  }

  async stop() {
    if (!this.proc) return;
    if (this.exitCode === null) {
      try {
        await this.raw('quit', {}, 15);
      } catch (_) {
        // gone already, or hung: killed below
      }
      const timer = setTimeout(() => this.proc.kill('SIGKILL'), 10000);
      await this.exited;
      clearTimeout(timer);
    }
  }
}

// ----- helpers --------------------------------------------------------------------------------------

function crc32(buf) {
  let c = ~0;
  for (const byte of buf) {
    c ^= byte;
    for (let k = 0; k < 8; k += 1) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
  }
  return ~c >>> 0;
}

/** A valid RGB PNG of random pixels. */
function noisePng(width, height) {
  const zlib = require('zlib');
  const chunk = (kind, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(Buffer.concat([Buffer.from(kind), data])));
    return Buffer.concat([len, Buffer.from(kind), data, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const rows = [];
  for (let y = 0; y < height; y += 1) rows.push(Buffer.from([0]), crypto.randomBytes(3 * width));
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr),
    chunk('IDAT', zlib.deflateSync(Buffer.concat(rows))), chunk('IEND', Buffer.alloc(0))]);
}

const shieldText = (s) => (s ? `${s.colour}${s.reason ? `/${s.reason}` : ''}` : 'null');

// ----- the test ---------------------------------------------------------------------------------------

async function scenario(hs, workdir, peers) {
  await timed('start Synapse', () => hs.start());
  check('Synapse answers /versions', true);

  const pw = {};
  const ids = {};
  await timed('register four users', async () => {
    for (const name of ['alice', 'bob', 'carol', 'dave']) {
      pw[name] = crypto.randomBytes(8).toString('hex');
      ids[name] = hs.register(name, pw[name]);
    }
  });
  must('users registered', ids.alice === `@alice:${SERVER}` && ids.dave === `@dave:${SERVER}`, JSON.stringify(ids));

  const [A, B, C, D] = ['alice', 'bob', 'carol', 'dave'].map((n) => new Peer(n, workdir));
  peers.push(A, B, C, D);
  for (const p of peers) p.start();

  // ---- the protocol ---------------------------------------------------------------------------------
  const unknown = await A.raw('frobnicate');
  check('unknown command: ok false, req echoed', unknown.ok === false && typeof unknown.error === 'string' && unknown.req === A.nextReq,
    JSON.stringify(unknown));
  const early = await A.raw('create_room', {});
  check('a command before login: ok false "not logged in"', early.ok === false && /not logged in/.test(early.error), JSON.stringify(early));
  const badIso = await D.raw('login', { homeserver: hs.url, user: 'dave', password: pw.dave, isolation: 'paranoid' });
  check('login with an unknown isolation mode is refused', badIso.ok === false && /isolation/.test(badIso.error), JSON.stringify(badIso));
  // A line that is not JSON gets a reply without "req".
  const before = A.stray.length;
  A.proc.stdin.write('this is not json\n');
  await A.raw('whoami').catch(() => null); // the reply to the bad line arrives first, without req
  check('a line that is not JSON gets an ok:false reply (no req)', A.stray.length === before + 1
    && /"ok":false/.test(A.stray[A.stray.length - 1]), JSON.stringify(A.stray.slice(before)));
  A.stray.splice(before, 1); // expected, not stray output

  // ---- login -----------------------------------------------------------------------------------------
  const logins = await timed('log in four clients (cross-signing bootstrap for three)', () => Promise.all([
    A.call('login', { homeserver: hs.url, user: 'alice', password: pw.alice }),
    B.call('login', { homeserver: hs.url, user: 'bob', password: pw.bob, isolation: 'exclude_insecure' }),
    C.call('login', { homeserver: hs.url, user: 'carol', password: pw.carol, cross_sign: false }),
    D.call('login', { homeserver: hs.url, user: 'dave', password: pw.dave, isolation: 'all_devices' }),
  ]));
  const [la, lb, lc, ld] = logins;
  check('login: user ids, device ids, isolation modes', la.user_id === ids.alice && lb.device_id && la.isolation === 'exclude_insecure'
    && lb.isolation === 'exclude_insecure' && lc.isolation === 'exclude_insecure' && ld.isolation === 'all_devices'
    && la.cross_signed && !lc.cross_signed, JSON.stringify(logins));

  // ---- keys_query -----------------------------------------------------------------------------------
  const kb = await A.call('keys_query', { user_id: ids.bob });
  const bobDev = kb.devices[lb.device_id] || {};
  check("keys_query at alice: bob's device cross-signed by bob (signedByOwner), bob not verified by alice",
    bobDev.cross_signed === true && bobDev.signed_by_self_signing_key === true && bobDev.self_signed === true
    && bobDev.cross_signing_verified === false && kb.self_signing_key_signed_by_master === true && kb.master_keys,
    JSON.stringify({ bobDev, identity: kb.identity }));
  const kself = await A.call('keys_query', { user_id: ids.alice });
  const aliceDev = kself.devices[la.device_id] || {};
  check("keys_query at alice: her own device is cross-signed and cross-signing-verified",
    aliceDev.cross_signed === true && aliceDev.cross_signing_verified === true, JSON.stringify(aliceDev));
  const kc = await A.call('keys_query', { user_id: ids.carol });
  const carolDev = kc.devices[lc.device_id] || {};
  check("keys_query at alice: carol's device is known but not cross-signed, carol has no master key",
    carolDev.known_to_crypto === true && carolDev.cross_signed === false && carolDev.self_signed === true && !kc.master_keys,
    JSON.stringify(carolDev));

  // ---- encrypted DM, alice <-> bob ------------------------------------------------------------------
  const dm = (await A.call('create_room', { invite: [ids.bob], is_direct: true, name: 'dm' })).room_id;
  const inv = await B.call('wait_invite', { timeout: 30, join: true });
  check('bob: DM invite from alice, is_direct, joined', inv.room_id === dm && inv.sender === ids.alice && inv.is_direct === true,
    JSON.stringify(inv));
  const mem = await A.call('members', { room_id: dm });
  await A.call('wait_event', { room_id: dm, type: 'm.room.member', state_key: ids.bob, membership: 'join', timeout: 30 });

  const t1 = await B.call('send_text', { room_id: dm, body: 'hello from a cross-signed device' });
  const e1 = (await A.call('wait_event', { room_id: dm, body_contains: 'hello from a cross-signed device', timeout: 30 })).event;
  check("alice (exclude_insecure) decrypts bob's text; shield NONE although bob is not verified by her",
    t1.encrypted && e1.decrypted === true && !e1.undecryptable && e1.event_id === t1.event_id && e1.shield
    && e1.shield.colour === 'NONE' && e1.shield.reason === null, JSON.stringify(e1));

  const png = noisePng(24, 16);
  const si = await B.call('send_image', { room_id: dm, bytes_b64: png.toString('base64'), mimetype: 'image/png', filename: 'noise.png' });
  const ei = (await A.call('wait_event', { room_id: dm, msgtype: 'm.image', sender: ids.bob, timeout: 30 })).event;
  check('encrypted image: file (no url) in the content, decrypted at alice, shield NONE',
    si.encrypted && si.content.file && !si.content.url && ei.decrypted && ei.content.file && !ei.content.url
    && ei.shield && ei.shield.colour === 'NONE', JSON.stringify(ei));
  const di = await A.call('download', { content: ei.content });
  check('encrypted image: downloaded (authenticated media), decrypted, bytes and sha256 match',
    di.encrypted === true && Buffer.from(di.bytes_b64, 'base64').equals(png)
    && di.sha256 === crypto.createHash('sha256').update(png).digest('hex'), JSON.stringify({ size: di.size, sha: di.sha256 }));
  const tamper = JSON.parse(JSON.stringify(ei.content));
  tamper.file.hashes.sha256 = Buffer.alloc(32).toString('base64').replace(/=+$/, '');
  const bad = await A.raw('download', { content: tamper });
  check('download refuses an attachment whose SHA-256 does not match', bad.ok === false && /SHA-256/.test(bad.error), JSON.stringify(bad));

  const reply = await A.call('send_event', { room_id: dm, type: 'm.room.message', content: {
    msgtype: 'm.text', body: 'reply from alice', 'm.relates_to': { 'm.in_reply_to': { event_id: t1.event_id } } } });
  const react = await A.call('send_event', { room_id: dm, type: 'm.reaction', content: {
    'm.relates_to': { rel_type: 'm.annotation', event_id: t1.event_id, key: '👍' } } });
  const er = (await B.call('wait_event', { room_id: dm, body_contains: 'reply from alice', relates_to: t1.event_id, timeout: 30 })).event;
  const ex = (await B.call('wait_event', { room_id: dm, type: 'm.reaction', relates_to: t1.event_id, timeout: 30 })).event;
  check("bob decrypts alice's reply (relates_to matches m.in_reply_to), shield NONE",
    reply.encrypted && er.decrypted && er.event_id === reply.event_id && er.shield && er.shield.colour === 'NONE', JSON.stringify(er));
  check('a reaction goes out in the clear (matrix-js-sdk does not encrypt m.reaction): encrypted false, shield null',
    react.encrypted === false && ex.event_id === react.event_id && ex.decrypted === false && !ex.undecryptable && ex.shield === null,
    JSON.stringify({ react, ex }));
  const ownAtAlice = (await A.call('wait_event', { room_id: dm, event_id: reply.event_id, timeout: 30 })).event;
  check("alice's own sent event is reported with its id, decrypted", ownAtAlice.decrypted === true && ownAtAlice.sender === ids.alice,
    JSON.stringify(ownAtAlice));

  const msgs = (await A.call('messages', { room_id: dm })).events;
  const order = [t1.event_id, si.event_id, reply.event_id, react.event_id].map((id) => msgs.findIndex((e) => e.event_id === id));
  check('messages: the DM events, oldest first', order.every((i) => i >= 0) && order.every((v, i) => i === 0 || v > order[i - 1]),
    JSON.stringify(order));
  check('members: both joined, encrypted', mem.encrypted === true && (await A.call('members', { room_id: dm })).joined.join() === [ids.alice, ids.bob].sort().join());

  // ---- a device that logged in a moment ago gets the next room key ------------------------------
  // bob's second client has no cross-signing secrets (no secret storage), so its bootstrap gives bob a
  // new identity: the new device is cross-signed by it, his first device no longer is.
  const B2 = new Peer('bob2', workdir);
  peers.push(B2);
  B2.start();
  const lb2 = await timed("bob's second device logs in", () => B2.call('login', { homeserver: hs.url, user: 'bob', password: pw.bob }));
  const t5 = await A.call('send_text', { room_id: dm, body: 'for the device that just logged in' });
  const e5 = (await B2.call('wait_event', { room_id: dm, event_id: t5.event_id, timeout: 30 })).event;
  check("bob's new device, logged in just before alice sent, decrypts her message (shield NONE)",
    lb2.device_id !== lb.device_id && e5.decrypted === true && e5.shield && e5.shield.colour === 'NONE', JSON.stringify(e5));
  const e5old = (await B.call('wait_event', { room_id: dm, event_id: t5.event_id, timeout: 30 })).event;
  note(`bob's first device (not signed by bob's new identity) on that message: decrypted ${e5old.decrypted}, failure ${e5old.failure || null}`);
  const kb2 = await A.call('keys_query', { user_id: ids.bob });
  note(`alice's keys_query after bob's reset: first device cross_signed ${kb2.devices[lb.device_id].cross_signed}, `
    + `new device cross_signed ${kb2.devices[lb2.device_id].cross_signed}, identity ${JSON.stringify(kb2.identity)}`);
  const old = e1.event_id;
  const e1again = (await A.call('shield', { event_id: old })).event;
  note(`shield at alice of bob's first message after his identity reset: ${shieldText(e1again.shield)}`);

  // ---- carol: a device that is not cross-signed ---------------------------------------------------
  const grp = (await A.call('create_room', { invite: [ids.carol, ids.dave], name: 'group' })).room_id;
  await C.call('join', { room_id: grp });
  await D.call('join', { room_id: grp });
  await A.call('wait_event', { room_id: grp, type: 'm.room.member', state_key: ids.dave, membership: 'join', timeout: 30 });
  await C.call('wait_event', { room_id: grp, type: 'm.room.member', state_key: ids.dave, membership: 'join', timeout: 30 });

  // Under OnlySignedDevicesIsolationMode a client without cross-signing of its own cannot encrypt at all.
  const refused = await C.raw('send_text', { room_id: grp, body: 'never sent: carol has no cross-signing' });
  check('carol (exclude_insecure, no cross-signing) cannot send: encryption refused',
    refused.ok === false && /cross-signing is not set up/.test(refused.error), JSON.stringify(refused));
  note(`carol's send under exclude_insecure: ${refused.error}`);
  await C.call('set_isolation', { isolation: 'all_devices' });
  const tc = await C.call('send_text', { room_id: grp, body: 'from an unsigned device' });
  const ca = (await A.call('wait_event', { room_id: grp, event_id: tc.event_id, timeout: 30 })).event;
  const cd = (await D.call('wait_event', { room_id: grp, event_id: tc.event_id, timeout: 30 })).event;
  check("alice (exclude_insecure) refuses carol's event: undecryptable, with a failure code",
    tc.encrypted && ca.undecryptable === true && ca.decrypted === false && ca.type === 'm.room.encrypted'
    && typeof ca.failure === 'string' && ca.failure.length > 0, JSON.stringify(ca));
  note(`alice (exclude_insecure) on carol's event: failure ${ca.failure}, shield ${shieldText(ca.shield)}`);
  check("dave (all_devices) decrypts carol's event", cd.decrypted === true && cd.content.body === 'from an unsigned device', JSON.stringify(cd));
  check("dave's shield for carol's event is not NONE", cd.shield && cd.shield.colour !== 'NONE', JSON.stringify(cd.shield));
  note(`dave (all_devices) on carol's event: decrypted ${cd.decrypted}, shield ${shieldText(cd.shield)}`);

  const ta = await A.call('send_text', { room_id: grp, body: 'alice to the group' });
  const ad = (await D.call('wait_event', { room_id: grp, event_id: ta.event_id, timeout: 30 })).event;
  const ac = (await C.call('wait_event', { room_id: grp, event_id: ta.event_id, timeout: 30 })).event;
  check("dave decrypts alice's group message (shield NONE)", ad.decrypted === true && ad.shield && ad.shield.colour === 'NONE', JSON.stringify(ad));
  check("alice shares no room key with carol's unsigned device: carol cannot decrypt", ac.undecryptable === true && ac.decrypted === false,
    JSON.stringify(ac));
  note(`carol on alice's group message: failure ${ac.failure}`);
  // Give a late key (if any were sent) time to arrive; the event must stay undecryptable.
  const late = await C.raw('wait_event', { room_id: grp, event_id: ta.event_id, decrypted: true, timeout: 3 });
  check('carol still cannot decrypt it 3 s later', late.ok === false && /timed out/.test(late.error), JSON.stringify(late));
  const lateA = A.events.filter((e) => e.event_id === tc.event_id && e.late);
  check("alice never decrypts carol's event later", lateA.every((e) => !e.decrypted), JSON.stringify(lateA));

  // dave switches to exclude_insecure: a new event from carol is then refused by him too.
  await D.call('set_isolation', { isolation: 'exclude_insecure' });
  const tc2 = await C.call('send_text', { room_id: grp, body: 'second from an unsigned device' });
  const cd2 = (await D.call('wait_event', { room_id: grp, event_id: tc2.event_id, timeout: 30 })).event;
  check('set_isolation exclude_insecure: dave refuses carol\'s next event', cd2.undecryptable === true && cd2.failure === ca.failure,
    JSON.stringify(cd2));

  const sh = await D.call('shield', { event_id: tc.event_id });
  check('shield: re-reads an event (already decrypted one stays decrypted)', sh.event.event_id === tc.event_id && sh.event.decrypted === true,
    JSON.stringify(sh.event));
  const to = await B.raw('wait_event', { room_id: dm, body_contains: 'never sent', timeout: 1 });
  check('wait_event times out with ok:false', to.ok === false && /timed out/.test(to.error), JSON.stringify(to));

  // ---- shutdown ---------------------------------------------------------------------------------------
  for (const p of peers) {
    await p.stop();
    check(`${p.name}: one reply per command, no stray output`, p.stray.length === 0 && p.replies === p.nextReq,
      `${p.replies}/${p.nextReq} replies, stray ${JSON.stringify(p.stray.slice(0, 2))}`);
    check(`${p.name}: exit status 0`, p.exitCode === 0, String(p.exitCode));
    const errors = p.events.filter((e) => e.event === 'sync_error' || e.event === 'agent_error');
    check(`${p.name}: no sync or agent errors`, errors.length === 0, JSON.stringify(errors.slice(0, 2)));
  }
}

async function main() {
  const workdir = fs.mkdtempSync(path.join(os.tmpdir(), 'js-e2ee-selftest-'));
  console.log(`workdir ${workdir}`);
  const hs = new Synapse(workdir);
  const peers = [];
  const t0 = Date.now();
  let interrupted = false;
  const onSignal = () => {
    interrupted = true;
    Promise.allSettled(peers.map((p) => p.proc && p.proc.kill('SIGKILL'))).then(() => hs.stop()).then(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await scenario(hs, workdir, peers);
  } catch (err) {
    check('scenario completed', false, err instanceof Failed ? err.message : `${err && err.stack ? err.stack : err}`);
  } finally {
    await Promise.allSettled(peers.map(async (p) => {
      try {
        await p.stop();
      } catch (_) {
        if (p.proc && p.exitCode === null) p.proc.kill('SIGKILL');
      }
    }));
    await timed('stop Synapse', () => hs.stop());
  }
  if (interrupted) return;
  console.log(`total ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  if (results.failed === 0 && !KEEP) {
    fs.rmSync(workdir, { recursive: true, force: true });
  } else {
    console.log(`kept ${workdir} (Synapse log: hs/homeserver.log; client stderr: *.stderr)`);
  }
  console.log(`${results.passed} passed, ${results.failed} failed`);
  process.exit(results.failed === 0 ? 0 : 1);
}

main();
