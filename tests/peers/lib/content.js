// Content (the plaintext inside Signal encryption, proto/content.proto) and media encryption
// (docs/interop-protocol.md §13.1, §15).
'use strict';

const crypto = require('crypto');
const { Content, DataMessage, encodeContent, decodeContent, toJson } = require('./proto');

// ---------------------------------------------------------------- content

/**
 * Builds a DataMessage from its JSON form. Accepted shorthands: a plain string is a text message;
 * `{text: "..."}` is `{text: {body: "..."}}`. Bytes fields may be base64 strings.
 */
function dataMessageFromJson(json) {
  if (typeof json === 'string') return { text: { body: json } };
  if (!json || typeof json !== 'object') throw new Error('content must be a string or a DataMessage object');
  const dm = { ...json };
  if (typeof dm.text === 'string') dm.text = { body: dm.text };
  const bodies = DataMessage.oneofs.body.oneof;
  const set = bodies.filter((b) => dm[b] !== undefined && dm[b] !== null);
  if (set.length !== 1) throw new Error(`a DataMessage needs exactly one of ${bodies.join(', ')}`);
  for (const k of Object.keys(dm)) {
    if (!DataMessage.fields[k]) throw new Error(`unknown DataMessage field "${k}"`);
  }
  return DataMessage.toObject(DataMessage.fromObject(dm), { longs: Number, enums: String });
}

/** Serialized Content carrying a DataMessage given in JSON form. */
function encodeDataContent(json) {
  return encodeContent({ data: dataMessageFromJson(json) });
}

/** Serialized Content carrying a sender key distribution. */
function encodeSenderKeyContent(group, distributionMessage) {
  return encodeContent({ sender_key_distribution: { group, distribution_message: Buffer.from(distributionMessage) } });
}

/** Decodes Content bytes; returns {kind: 'data'|'sender_key_distribution', value, json}. */
function parseContent(bytes) {
  const c = decodeContent(bytes);
  if (!c.body) throw new Error('Content without body');
  return { kind: c.body, value: c[c.body], json: compact(toJson(Content, c)[c.body]) };
}

/** Drops null/empty-default noise from a JSON object so events stay readable. */
function compact(v) {
  if (Array.isArray(v)) return v.map(compact);
  if (v && typeof v === 'object') {
    const out = {};
    for (const [k, x] of Object.entries(v)) {
      if (x === null || x === undefined) continue;
      if (Array.isArray(x) && x.length === 0) continue;
      out[k] = compact(x);
    }
    return out;
  }
  return v;
}

/** Number of Unicode code points in a string (Format ranges count these, §15). */
function codePointLength(s) {
  let n = 0;
  for (const _ of s) n++; // eslint-disable-line no-unused-vars
  return n;
}

/** The substring of `s` covering code points [start, start + length). */
function codePointSlice(s, start, length) {
  return Array.from(s).slice(start, start + length).join('');
}

// ---------------------------------------------------------------- media

const MEDIA_KEY_LEN = 64;
const IV_LEN = 16;
const MAC_LEN = 32;

/**
 * Encrypts a file for upload: blob = iv || AES-256-CBC-PKCS7(plaintext) || HMAC-SHA256(mac_key, iv || ct).
 * @returns {{blob: Buffer, key: Buffer, sha256: Buffer, size: number}}
 */
function encryptMedia(plaintext, { key = crypto.randomBytes(MEDIA_KEY_LEN), iv = crypto.randomBytes(IV_LEN) } = {}) {
  if (key.length !== MEDIA_KEY_LEN) throw new Error('media key must be 64 bytes');
  if (iv.length !== IV_LEN) throw new Error('iv must be 16 bytes');
  const cipher = crypto.createCipheriv('aes-256-cbc', key.subarray(0, 32), iv);
  const ct = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  const mac = crypto.createHmac('sha256', key.subarray(32, 64)).update(iv).update(ct).digest();
  const blob = Buffer.concat([iv, ct, mac]);
  return { blob, key: Buffer.from(key), sha256: sha256(blob), size: plaintext.length };
}

/**
 * Checks and decrypts a downloaded blob: SHA-256 of the blob, then the HMAC, then AES-CBC and the
 * padding, then the plaintext size (when given). Throws on any mismatch.
 */
function decryptMedia(blob, { key, sha256: expectedHash, size }) {
  key = Buffer.from(key);
  if (key.length !== MEDIA_KEY_LEN) throw new Error('media key must be 64 bytes');
  if (expectedHash && expectedHash.length) {
    const h = sha256(blob);
    if (!crypto.timingSafeEqual(h, Buffer.from(expectedHash))) throw new Error('media sha256 mismatch');
  }
  if (blob.length < IV_LEN + 16 + MAC_LEN || (blob.length - IV_LEN - MAC_LEN) % 16 !== 0) {
    throw new Error('media blob has an impossible size');
  }
  const iv = blob.subarray(0, IV_LEN);
  const ct = blob.subarray(IV_LEN, blob.length - MAC_LEN);
  const mac = blob.subarray(blob.length - MAC_LEN);
  const expectedMac = crypto.createHmac('sha256', key.subarray(32, 64)).update(iv).update(ct).digest();
  if (!crypto.timingSafeEqual(mac, expectedMac)) throw new Error('media HMAC mismatch');
  const decipher = crypto.createDecipheriv('aes-256-cbc', key.subarray(0, 32), iv);
  let plaintext;
  try {
    plaintext = Buffer.concat([decipher.update(ct), decipher.final()]);
  } catch (e) {
    throw new Error('media padding is invalid');
  }
  if (size !== undefined && size !== null && size !== 0 && plaintext.length !== Number(size)) {
    throw new Error(`media size mismatch: ${plaintext.length} != ${size}`);
  }
  return plaintext;
}

function sha256(buf) {
  return crypto.createHash('sha256').update(buf).digest();
}

/** A Media type name guessed from a mimetype. */
function mediaTypeFor(mimetype = '') {
  if (mimetype.startsWith('image/')) return 'IMAGE';
  if (mimetype.startsWith('video/')) return 'VIDEO';
  if (mimetype.startsWith('audio/ogg')) return 'VOICE';
  if (mimetype.startsWith('audio/')) return 'AUDIO';
  return 'FILE';
}

module.exports = {
  dataMessageFromJson,
  encodeDataContent,
  encodeSenderKeyContent,
  parseContent,
  compact,
  codePointLength,
  codePointSlice,
  encryptMedia,
  decryptMedia,
  sha256,
  mediaTypeFor,
  MEDIA_KEY_LEN,
};
