// Loads the project's normative schemas (proto/interop.proto, proto/content.proto) at run time and
// offers encode/decode helpers. Field names stay as written in the .proto files (snake_case).
'use strict';

const path = require('path');
const protobuf = require('protobufjs');

const PROTO_DIR = process.env.INTEROP_PROTO_DIR || path.resolve(__dirname, '..', '..', '..', 'proto');

const root = new protobuf.Root();
root.loadSync([path.join(PROTO_DIR, 'interop.proto'), path.join(PROTO_DIR, 'content.proto')], { keepCase: true });
root.resolveAll();

const Stanza = root.lookupType('interop.v1.Stanza');
const Content = root.lookupType('interop.content.v1.Content');
const DataMessage = root.lookupType('interop.content.v1.DataMessage');

// Bodies a client may send (fields 10..39) and bodies only the gateway sends (40 and up).
const CLIENT_BODIES = new Set();
const GATEWAY_BODIES = new Set();
for (const f of Stanza.oneofs.body.fieldsArray) {
  (f.id < 40 ? CLIENT_BODIES : GATEWAY_BODIES).add(f.name);
}

// For our own processing: numbers for uint64 (all values here stay below 2^53), enum names,
// Buffers for bytes, unset scalars filled with their defaults, `body` naming the oneof case.
const DECODE_OPTS = { longs: Number, enums: String, defaults: true, oneofs: true };
// For JSON output: bytes as base64.
const JSON_OPTS = { longs: Number, enums: String, bytes: String, defaults: true, oneofs: true };

/** Encodes a Stanza given as {id, <body name>: {...}}. */
function encodeStanza(obj) {
  const bodies = Object.keys(obj).filter((k) => k !== 'id');
  if (bodies.length !== 1 || !Stanza.fields[bodies[0]]) {
    throw new Error(`bad stanza: needs exactly one known body, got [${bodies.join(', ')}]`);
  }
  return Buffer.from(Stanza.encode(Stanza.fromObject(obj)).finish());
}

/** Decodes stanza bytes to {id, body: '<name>', <name>: {...}}. Throws on malformed bytes. */
function decodeStanza(bytes) {
  return Stanza.toObject(Stanza.decode(bytes), DECODE_OPTS);
}

/** Encodes a Content given as {data: {...}} or {sender_key_distribution: {...}}. */
function encodeContent(obj) {
  return Buffer.from(Content.encode(Content.fromObject(obj)).finish());
}

/** Decodes Content bytes (Buffers for bytes fields). */
function decodeContent(bytes) {
  return Content.toObject(Content.decode(bytes), DECODE_OPTS);
}

/** Converts a decoded protobuf object of `type` to its JSON form (bytes as base64). */
function toJson(type, obj) {
  return type.toObject(type.fromObject(obj), JSON_OPTS);
}

module.exports = {
  PROTO_DIR,
  root,
  protobuf,
  Stanza,
  Content,
  DataMessage,
  CLIENT_BODIES,
  GATEWAY_BODIES,
  encodeStanza,
  decodeStanza,
  encodeContent,
  decodeContent,
  toJson,
};
