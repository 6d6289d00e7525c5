// Transport of the interop protocol (docs/interop-protocol.md §2, §3):
// TCP, a Noise_XX_25519_ChaChaPoly_BLAKE2b handshake with prologue "interop/1", every Noise message
// framed by a 2-byte big-endian length, then a secure byte stream of records
// (4-byte big-endian length + one protobuf Stanza).
//
// This module knows nothing about protobuf: it moves records (Buffers) both ways.
'use strict';

const net = require('net');
const { EventEmitter } = require('events');
const Noise = require('noise-handshake');
const Cipher = require('noise-handshake/cipher');
const curve = require('noise-handshake/dh');

const PROTOCOL_NAME = 'Noise_XX_25519_ChaChaPoly_BLAKE2b';
const PROLOGUE = Buffer.from('interop/1', 'ascii');
const MAX_NOISE_MESSAGE = 65535;
const TAG_LEN = 16;
const MAX_PLAINTEXT = MAX_NOISE_MESSAGE - TAG_LEN; // 65519
const MAX_RECORD = 1048576; // 1 MiB
// With empty payloads the XX messages have fixed sizes: e | e, enc(s), enc() | enc(s), enc().
const HANDSHAKE_LENGTHS = [32, 96, 64];

class ProtocolError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'ProtocolError';
    this.code = code;
  }
}

/** A Noise message as a TCP frame: 2-byte big-endian length, then the bytes (copied). */
function encodeFrame(message) {
  if (message.length < 1 || message.length > MAX_NOISE_MESSAGE) {
    throw new ProtocolError('FRAME_SIZE', `Noise message of ${message.length} bytes cannot be framed`);
  }
  const out = Buffer.allocUnsafe(2 + message.length);
  out.writeUInt16BE(message.length, 0);
  Buffer.from(message.buffer, message.byteOffset, message.length).copy(out, 2);
  return out;
}

/** Splits a TCP byte stream into Noise messages. */
class FrameDecoder {
  constructor() {
    this.buf = Buffer.alloc(0);
  }

  /** Adds bytes; returns the complete frames now available. Throws on a zero-length frame. */
  push(chunk) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : Buffer.from(chunk);
    const frames = [];
    let off = 0;
    while (this.buf.length - off >= 2) {
      const len = this.buf.readUInt16BE(off);
      if (len === 0) throw new ProtocolError('FRAME_SIZE', 'zero-length frame');
      if (this.buf.length - off - 2 < len) break;
      frames.push(this.buf.subarray(off + 2, off + 2 + len));
      off += 2 + len;
    }
    this.buf = this.buf.subarray(off);
    return frames;
  }
}

/** Cuts one record (4-byte length + stanza bytes) into transport plaintexts of at most 65519 bytes. */
function recordToPlaintexts(stanzaBytes) {
  if (stanzaBytes.length > MAX_RECORD) {
    throw new ProtocolError('TOO_LARGE', `record of ${stanzaBytes.length} bytes is over ${MAX_RECORD}`);
  }
  const whole = Buffer.allocUnsafe(4 + stanzaBytes.length);
  whole.writeUInt32BE(stanzaBytes.length, 0);
  Buffer.from(stanzaBytes.buffer, stanzaBytes.byteOffset, stanzaBytes.length).copy(whole, 4);
  const parts = [];
  for (let off = 0; off < whole.length; off += MAX_PLAINTEXT) {
    parts.push(whole.subarray(off, Math.min(off + MAX_PLAINTEXT, whole.length)));
  }
  return parts;
}

/** Reassembles records from the concatenated transport plaintexts. */
class RecordDecoder {
  constructor(maxRecord = MAX_RECORD) {
    this.maxRecord = maxRecord;
    this.chunks = [];
    this.size = 0;
  }

  /** Adds one transport plaintext; returns the complete records (stanza bytes) now available. */
  push(plaintext) {
    if (plaintext.length) {
      this.chunks.push(Buffer.from(plaintext));
      this.size += plaintext.length;
    }
    const records = [];
    for (;;) {
      if (this.size < 4) break;
      const head = this._peek(4);
      const len = head.readUInt32BE(0);
      if (len > this.maxRecord) {
        throw new ProtocolError('TOO_LARGE', `record length ${len} is over ${this.maxRecord}`);
      }
      if (this.size < 4 + len) break;
      const all = this._take(4 + len);
      records.push(all.subarray(4));
    }
    return records;
  }

  _peek(n) {
    if (this.chunks[0].length >= n) return this.chunks[0].subarray(0, n);
    const joined = Buffer.concat(this.chunks);
    this.chunks = [joined];
    return joined.subarray(0, n);
  }

  _take(n) {
    const joined = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = joined.subarray(0, n);
    const rest = joined.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.size -= n;
    return out;
  }
}

/** Generates an X25519 key pair {publicKey, secretKey} usable as a Noise static key. */
function generateStaticKeyPair(secretKey) {
  return curve.generateKeyPair(secretKey ? Buffer.from(secretKey) : undefined);
}

/**
 * One end of an interop connection. Events:
 *  - 'record' (Buffer): one decrypted record (the stanza bytes)
 *  - 'close' ({reason}): the connection is gone (emitted once)
 *  - 'oversize' (): the peer announced a record over 1 MiB; emitted just before closing, so the
 *    gateway role can still send its TOO_LARGE error.
 */
class SecureChannel extends EventEmitter {
  /**
   * @param {net.Socket} socket a connected socket
   * @param {object} opts {initiator: bool, staticKeyPair?, pinnedKey?: Buffer(32), maxRecord?}
   */
  constructor(socket, opts) {
    super();
    this.socket = socket;
    this.initiator = !!opts.initiator;
    this.pinnedKey = opts.pinnedKey ? Buffer.from(opts.pinnedKey) : null;
    if (this.initiator && (!this.pinnedKey || this.pinnedKey.length !== 32)) {
      throw new ProtocolError('CONFIG', 'the initiator needs the 32-byte gateway key to pin');
    }
    this.staticKeyPair = opts.staticKeyPair || generateStaticKeyPair();
    this.noise = new Noise('XX', this.initiator, this.staticKeyPair);
    this.noise.initialise(PROLOGUE);
    this.step = 0; // index of the next handshake message (0, 1, 2)
    this.frames = new FrameDecoder();
    this.records = new RecordDecoder(opts.maxRecord || MAX_RECORD);
    this.sendCipher = null;
    this.recvCipher = null;
    this.remoteStatic = null;
    this.handshakeHash = null;
    this.closed = false;
    this._handshake = new Promise((resolve, reject) => {
      this._resolveHandshake = resolve;
      this._rejectHandshake = reject;
    });
    this._handshake.catch(() => {}); // observed through handshake()
    socket.setNoDelay(true);
    socket.on('data', (chunk) => this._onData(chunk));
    socket.on('error', (err) => this._fail(`socket error: ${err.message}`));
    socket.on('close', () => this._fail('connection closed by peer'));
    if (this.initiator) this._sendHandshakeMessage(); // -> e
  }

  /** Resolves when the handshake is complete (the gateway key checked), rejects on failure. */
  handshake() {
    return this._handshake;
  }

  get ready() {
    return this.sendCipher !== null;
  }

  /** Sends one record. `stanzaBytes` is the encoded Stanza. */
  sendRecord(stanzaBytes) {
    if (this.closed) throw new ProtocolError('CLOSED', 'connection is closed');
    if (!this.ready) throw new ProtocolError('NOT_READY', 'handshake not complete');
    const parts = recordToPlaintexts(stanzaBytes);
    this.socket.cork();
    for (const p of parts) this.socket.write(encodeFrame(this.sendCipher.encrypt(p)));
    process.nextTick(() => this.socket.uncork());
  }

  /** Closes the connection (after flushing what was written). */
  close(reason = 'closed locally') {
    if (this.closed) return;
    this.closed = true;
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 1000).unref();
    this._rejectHandshake(new ProtocolError('CLOSED', reason));
    this.emit('close', { reason });
  }

  _fail(reason) {
    if (this.closed) return;
    this.closed = true;
    this.socket.destroy();
    this._rejectHandshake(new ProtocolError('CLOSED', reason));
    this.emit('close', { reason });
  }

  _sendHandshakeMessage() {
    // noise-handshake wipes its ephemeral key buffers when the handshake completes, and some of
    // them can alias the returned message: encodeFrame copies the bytes before anything else runs.
    const msg = this.noise.send();
    this.socket.write(encodeFrame(msg));
    this.step += 1;
  }

  _onData(chunk) {
    if (this.closed) return;
    let frames;
    try {
      frames = this.frames.push(chunk);
    } catch (e) {
      this._fail(e.message);
      return;
    }
    for (const frame of frames) {
      if (this.closed) return;
      try {
        if (this.ready) this._onTransportMessage(frame);
        else this._onHandshakeMessage(frame);
      } catch (e) {
        if (e.code === 'TOO_LARGE') this.emit('oversize');
        if (!this.ready) this._rejectHandshake(e);
        this._fail(e.message);
        return;
      }
    }
  }

  _onHandshakeMessage(frame) {
    const expected = HANDSHAKE_LENGTHS[this.step];
    if (frame.length !== expected) {
      throw new ProtocolError('HANDSHAKE', `handshake message ${this.step + 1} has ${frame.length} bytes, expected ${expected}`);
    }
    const payload = this.noise.recv(frame);
    this.step += 1;
    if (payload.length !== 0) throw new ProtocolError('HANDSHAKE', 'non-empty handshake payload');
    if (this.initiator) {
      // we just read message 2 (<- e, ee, s, es): check the pinned gateway key before answering
      const rs = Buffer.from(this.noise.rs);
      if (!rs.equals(this.pinnedKey)) {
        throw new ProtocolError('PINNING', 'gateway static key does not match the pinned key');
      }
      this._sendHandshakeMessage(); // -> s, se
    } else if (this.step === 1) {
      this._sendHandshakeMessage(); // <- e, ee, s, es
    }
    if (this.noise.complete) this._onComplete();
  }

  _onComplete() {
    this.remoteStatic = Buffer.from(this.noise.rs);
    this.handshakeHash = Buffer.from(this.noise.hash);
    this.sendCipher = new Cipher(Buffer.from(this.noise.tx));
    this.recvCipher = new Cipher(Buffer.from(this.noise.rx));
    this._resolveHandshake({ remoteStatic: this.remoteStatic, handshakeHash: this.handshakeHash });
  }

  _onTransportMessage(frame) {
    let plaintext;
    try {
      plaintext = this.recvCipher.decrypt(frame);
    } catch (e) {
      throw new ProtocolError('DECRYPT', 'transport message failed to decrypt');
    }
    for (const record of this.records.push(plaintext)) this.emit('record', record);
  }
}

/**
 * Opens a client connection: TCP connect, handshake as initiator, gateway key pinned.
 * @returns {Promise<SecureChannel>} once the handshake is complete
 */
function connect({ host, port, serverKey, staticKeyPair, timeoutMs = 10000 }) {
  const pinnedKey = Buffer.isBuffer(serverKey) ? serverKey : Buffer.from(String(serverKey), 'base64');
  if (pinnedKey.length !== 32) {
    return Promise.reject(new ProtocolError('CONFIG', 'server key must be 32 bytes (base64)'));
  }
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new ProtocolError('TIMEOUT', `no handshake with ${host}:${port} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.once('connect', () => {
      const channel = new SecureChannel(socket, { initiator: true, pinnedKey, staticKeyPair });
      channel.handshake().then(
        () => {
          clearTimeout(timer);
          resolve(channel);
        },
        (err) => {
          clearTimeout(timer);
          reject(err);
        },
      );
    });
  });
}

/**
 * Listens for connections and runs the responder side of the handshake (for test gateways).
 * `onChannel(channel)` is called for every accepted connection right away (before the handshake
 * completes); use channel.handshake() to wait for it.
 */
function listen({ host = '127.0.0.1', port = 0, staticKeyPair }, onChannel) {
  const server = net.createServer((socket) => {
    const channel = new SecureChannel(socket, { initiator: false, staticKeyPair });
    onChannel(channel);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve(server));
  });
}

module.exports = {
  PROTOCOL_NAME,
  PROLOGUE,
  MAX_NOISE_MESSAGE,
  MAX_PLAINTEXT,
  MAX_RECORD,
  HANDSHAKE_LENGTHS,
  ProtocolError,
  encodeFrame,
  FrameDecoder,
  recordToPlaintexts,
  RecordDecoder,
  generateStaticKeyPair,
  SecureChannel,
  connect,
  listen,
};
