#!/usr/bin/env node
// Test contact for the interop network, driven by JSON lines.
//
//   node contact.js                 read commands on stdin, one JSON object per line:
//                                   {"cmd": "connect", "host": "127.0.0.1", "port": 7000, "server_key": "<base64>"}
//                                   every command gets one reply line {"ok": true, ...} or
//                                   {"ok": false, "error": "...", "code": "..."}; asynchronous
//                                   things arrive as {"event": "...", ...} lines.
//   node contact.js --demo ...      the demo contact (see demo.js / README.md)
//
// MIB_CONTACT_LIBSIGNAL picks the libsignal of this process: unset or "current" for
// @signalapp/libsignal-client 0.103.0 (PQXDH only), "x3dh" for 0.72.1 (can also do X3DH; with the
// set_kyber command it becomes an X3DH-era client). Anything else stops the process at start (exit 2).
//
// Commands run one at a time in the order received. A command may carry "req": any JSON value,
// which is copied into its reply.
'use strict';

const readline = require('readline');

const COMMANDS = [
  'connect', 'disconnect', 'register', 'verify', 'login', 'upload_keys', 'key_counts', 'reset_identity',
  'ping', 'status', 'send', 'receipt', 'typing', 'presence', 'set_profile', 'get_profile',
  'create_group', 'update_group', 'get_group', 'send_group', 'upload_media', 'download_media',
  'hold_acks', 'auto_receipts', 'auto_replenish', 'set_kyber', 'drain', 'save',
];

function writeLine(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

/** Loads the agent (and with it the libsignal chosen by MIB_CONTACT_LIBSIGNAL); exits 2 when that fails. */
function loadAgent() {
  try {
    return require('./lib/contact-agent');
  } catch (e) {
    process.stderr.write(`contact.js: cannot start: ${e && e.message ? e.message : e}\n`);
    process.exit(2);
  }
}

function runAgent() {
  const { Contact } = loadAgent();
  const contact = new Contact({ emit: writeLine });
  const rl = readline.createInterface({ input: process.stdin });
  let chain = Promise.resolve();
  let quitting = false;

  const quit = async () => {
    if (quitting) return;
    quitting = true;
    try {
      await contact.disconnect();
    } catch (_) {
      // already gone
    }
    process.exit(0);
  };

  rl.on('line', (line) => {
    if (!line.trim()) return;
    chain = chain.then(async () => {
      let req = {};
      try {
        req = JSON.parse(line);
        const { cmd, req: tag, ...args } = req;
        if (cmd === 'quit') {
          writeLine({ ok: true, ...(tag !== undefined ? { req: tag } : {}) });
          await quit();
          return;
        }
        if (!COMMANDS.includes(cmd)) throw new Error(`unknown command "${cmd}"; known: ${COMMANDS.join(', ')}, quit`);
        const res = await contact[cmd](args);
        writeLine({ ok: true, ...(tag !== undefined ? { req: tag } : {}), ...res });
      } catch (e) {
        writeLine({ ok: false, ...(req && req.req !== undefined ? { req: req.req } : {}), error: e && e.message ? e.message : String(e), code: e && e.code !== undefined ? e.code : null });
      }
    });
  });
  rl.on('close', () => chain.then(quit));
}

if (require.main === module) {
  if (process.argv.includes('--demo')) {
    loadAgent();
    require('./lib/demo').main(process.argv.slice(2)).catch((e) => {
      process.stderr.write(`demo contact failed: ${e && e.stack ? e.stack : e}\n`);
      process.exit(1);
    });
  } else {
    runAgent();
  }
}

module.exports = { COMMANDS };
