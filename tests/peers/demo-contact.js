#!/usr/bin/env node
// The demo contact: `node demo-contact.js --account +15550000100 --gateway 127.0.0.1:7000
// --server-key <base64> --code 123456 [--name "Demo Contact"] [--state file.json]`.
// Same as `node contact.js --demo ...`; see lib/demo.js.
'use strict';

require('./lib/demo').main(process.argv.slice(2)).catch((e) => {
  process.stderr.write(`demo contact failed: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
