// The demo contact: registers an account, uploads keys, and answers every text it receives with
// "You said: <text>" (as a reply), after marking it read and reacting to it. Media gets a short
// acknowledgement once the download checked out. It reconnects when the gateway goes away.
//
//   node demo-contact.js --account +15550000100 --gateway 127.0.0.1:7000 --server-key <base64> \
//        [--code 123456] [--name "Demo Contact"] [--state demo-contact.json] [--prekeys 50]
//
// Every line on stdout is JSON: the events the contact sees, and {"event": "ready", ...} once it can
// be reached.
'use strict';

const fs = require('fs');
const { Contact } = require('./contact-agent');

const ECHO_PREFIX = 'You said: ';

/** A 64×64 PNG for the contact's profile: a teal disc on white (profiles carry public images). */
function avatarPng() {
  const zlib = require('zlib');
  const size = 64;
  const rows = [];
  for (let y = 0; y < size; y++) {
    const row = Buffer.alloc(1 + size * 3); // filter byte 0, then RGB
    for (let x = 0; x < size; x++) {
      const inside = (x - 31.5) ** 2 + (y - 31.5) ** 2 < 30 ** 2;
      const rgb = inside ? [0x00, 0x89, 0x7b] : [0xff, 0xff, 0xff];
      Buffer.from(rgb).copy(row, 1 + x * 3);
    }
    rows.push(row);
  }
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(zlib.crc32(body) >>> 0);
    return Buffer.concat([len, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(size, 0);
  ihdr.writeUInt32BE(size, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // truecolour
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', zlib.deflateSync(Buffer.concat(rows))),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

function parseArgs(argv) {
  const opts = { name: 'Demo Contact', prekeys: 50, code: null, state: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--demo') continue;
    else if (a === '--account') opts.account = val();
    else if (a === '--gateway') opts.gateway = val();
    else if (a === '--server-key') opts.serverKey = val();
    else if (a === '--code') opts.code = val();
    else if (a === '--name') opts.name = val();
    else if (a === '--state') opts.state = val();
    else if (a === '--prekeys') opts.prekeys = Number(val());
    else throw new Error(`unknown argument ${a}`);
  }
  for (const k of ['account', 'gateway', 'serverKey']) {
    if (!opts[k]) throw new Error(`--${k === 'serverKey' ? 'server-key' : k} is required`);
  }
  const m = /^(.*):(\d+)$/.exec(opts.gateway);
  if (!m) throw new Error('--gateway must be host:port');
  opts.host = m[1].replace(/^\[|\]$/g, '');
  opts.port = Number(m[2]);
  return opts;
}

const log = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
// Whoever reads our output went away: nobody to demo to any more.
process.stdout.on('error', () => process.exit(0));

async function main(argv) {
  const opts = parseArgs(argv);
  let saved = null;
  if (opts.state && fs.existsSync(opts.state)) {
    saved = JSON.parse(fs.readFileSync(opts.state, 'utf8'));
    if (saved.account !== opts.account) saved = null;
  }

  let stopping = false;
  let conflict = false;
  let replies = Promise.resolve();
  const contact = new Contact({ emit: (ev) => onEvent(ev), saved });
  contact.auto_replenish({ count: opts.prekeys });

  const persist = () => {
    if (!opts.state) return;
    const tmp = `${opts.state}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(contact.save()));
    fs.renameSync(tmp, opts.state);
  };

  function onEvent(ev) {
    log(ev);
    if (ev.event === 'gateway_error' && ev.code === 'CONFLICT') conflict = true;
    if (ev.event === 'message' && !ev.redelivered) replies = replies.then(() => answer(ev)).catch((e) => log({ event: 'demo_error', error: e.message }));
    if (ev.event === 'disconnected' && !ev.expected && !stopping) {
      if (conflict) {
        log({ event: 'demo_stopped', reason: 'another connection logged in to this account' });
        process.exit(3);
      }
      reconnect();
    }
    if (['message', 'sender_key', 'keys_replenished', 'identity_change'].includes(ev.event)) {
      try {
        persist();
      } catch (e) {
        log({ event: 'demo_error', error: `saving state: ${e.message}` });
      }
    }
  }

  async function answer(ev) {
    const c = ev.content || {};
    const reply = async (dm) => {
      if (ev.group) await contact.send_group({ group: ev.group, content: dm });
      else await contact.send({ to: ev.from, content: dm });
    };
    if (c.text && typeof c.text.body === 'string') {
      if (c.text.body.startsWith(ECHO_PREFIX)) return; // never answer an echo (two demos would loop)
      await contact.receipt({ to: ev.from, type: 'READ', message_ids: [ev.message_id], group: ev.group || '' });
      await reply({ reaction: { target: ev.message_id, emoji: '👍', target_author: ev.from } });
      await reply({ text: { body: `${ECHO_PREFIX}${c.text.body}` }, reply_to: { message_id: ev.message_id, author: ev.from } });
    } else if (c.media) {
      await contact.receipt({ to: ev.from, type: 'READ', message_ids: [ev.message_id], group: ev.group || '' });
      let what;
      try {
        const got = await contact.download_media({ media: c.media });
        what = `Got your ${String(c.media.type || 'file').toLowerCase()}${c.media.filename ? ` "${c.media.filename}"` : ''} (${got.size} bytes, checksums ok)`;
      } catch (e) {
        what = `I could not open your attachment: ${e.message}`;
      }
      await reply({ text: { body: what }, reply_to: { message_id: ev.message_id, author: ev.from } });
    }
  }

  async function start() {
    await contact.connect({ host: opts.host, port: opts.port, server_key: opts.serverKey });
    let fresh = false;
    if (!contact.secret) {
      await registerAccount();
      fresh = true;
    }
    let logged;
    try {
      logged = await contact.login({});
    } catch (e) {
      if (e.code !== 'UNAUTHORIZED') throw e;
      // the gateway forgot us (or someone re-registered the number): register again
      await registerAccount();
      fresh = true;
      logged = await contact.login({});
    }
    if (fresh || logged.one_time_prekeys < 10 || logged.kyber_prekeys < 10) {
      await contact.upload_keys({ one_time: opts.prekeys, kyber: opts.prekeys });
    }
    const avatar = await contact.upload_media({ bytes_b64: avatarPng().toString('base64'), raw: true });
    await contact.set_profile({ name: opts.name, avatar_blob: avatar.blob });
    await contact.presence({ online: true });
    persist();
    log({ event: 'ready', account: opts.account, identity_key: contact.status().identity_key });
  }

  async function registerAccount() {
    if (opts.code === null) {
      const e = new Error('the account is not registered here and no --code was given');
      e.code = 'NO_CODE';
      throw e;
    }
    await contact.register({ account: opts.account, code: opts.code });
  }

  let reconnecting = false;
  async function reconnect() {
    if (reconnecting) return;
    reconnecting = true;
    for (let delay = 1000; !stopping; delay = Math.min(delay * 2, 30000)) {
      await new Promise((r) => setTimeout(r, delay));
      try {
        await start();
        break;
      } catch (e) {
        log({ event: 'demo_reconnect_failed', error: e.message, retry_in_ms: Math.min(delay * 2, 30000) });
        await contact.disconnect().catch(() => {});
      }
    }
    reconnecting = false;
  }

  const stop = async () => {
    stopping = true;
    await contact.disconnect().catch(() => {});
    persist();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);

  try {
    await start();
  } catch (e) {
    log({ event: 'demo_start_failed', error: e.message });
    await contact.disconnect().catch(() => {});
    if (e.code === 'NO_CODE' || e.code === 'BAD_CODE' || e.code === 'CODE_EXPIRED') process.exit(2);
    reconnect();
  }
}

module.exports = { main, parseArgs };
