// Stanza-level client of the interop gateway (docs/interop-protocol.md §4): numbered requests with
// one answer each, id-0 pushes, keepalive pings, automatic retry after RATE_LIMITED.
'use strict';

const { EventEmitter } = require('events');
const transport = require('./noise-transport');
const { encodeStanza, decodeStanza } = require('./proto');

const PING_INTERVAL_MS = 30000;
const DEAD_AFTER_MS = 90000;

/** An `Error` stanza from the gateway, as a JS error. */
class GatewayError extends Error {
  constructor(err) {
    super(`${err.code}${err.message ? `: ${err.message}` : ''}`);
    this.name = 'GatewayError';
    this.code = err.code;
    this.gatewayMessage = err.message;
    this.retryAfterMs = err.retry_after_ms || 0;
  }
}

/**
 * Events:
 *  - 'push' (name, value): a stanza with id 0 (Envelope, QueueDrained, Typing, Presence, PrekeysLow, Error)
 *  - 'close' ({reason}): the connection ended
 */
class GatewayClient extends EventEmitter {
  constructor() {
    super();
    this.channel = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {resolve, reject, timer}
    this.lastReceived = 0;
    this.pingTimer = null;
  }

  get connected() {
    return !!this.channel && !this.channel.closed;
  }

  async connect({ host, port, serverKey, timeoutMs }) {
    if (this.connected) throw new Error('already connected');
    const channel = await transport.connect({ host, port, serverKey, timeoutMs });
    this.channel = channel;
    this.nextId = 1;
    this.lastReceived = Date.now();
    channel.on('record', (bytes) => this._onRecord(bytes));
    channel.on('close', ({ reason }) => this._onClose(reason));
    this.pingTimer = setInterval(() => this._keepalive(), PING_INTERVAL_MS);
    this.pingTimer.unref();
    return { remoteStatic: channel.remoteStatic };
  }

  /**
   * Sends a request and resolves with the answer {name, value}; rejects with GatewayError for an
   * Error answer. RATE_LIMITED answers are retried after retry_after_ms (up to `retries` times).
   */
  async request(name, body = {}, { timeoutMs = 30000, retries = 5 } = {}) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this._requestOnce(name, body, timeoutMs);
      } catch (e) {
        if (e instanceof GatewayError && e.code === 'RATE_LIMITED' && attempt < retries) {
          await new Promise((r) => setTimeout(r, Math.max(1, e.retryAfterMs)));
          continue;
        }
        throw e;
      }
    }
  }

  /** Sends a stanza with id 0 (only Ack may do that): no answer is expected. */
  sendUnanswered(name, body) {
    this._send(0, name, body);
  }

  close(reason = 'closed by client') {
    if (this.channel) this.channel.close(reason);
  }

  _requestOnce(name, body, timeoutMs) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`no answer to ${name} (id ${id}) within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, name });
      try {
        this._send(id, name, body);
      } catch (e) {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(e);
      }
    });
  }

  _send(id, name, body) {
    if (!this.connected) throw new Error('not connected');
    this.channel.sendRecord(encodeStanza({ id, [name]: body }));
  }

  _onRecord(bytes) {
    this.lastReceived = Date.now();
    let stanza;
    try {
      stanza = decodeStanza(bytes);
    } catch (e) {
      this.close(`undecodable stanza from gateway: ${e.message}`);
      return;
    }
    const name = stanza.body;
    if (!name) {
      this.close('stanza without body from gateway');
      return;
    }
    const value = stanza[name];
    if (stanza.id === 0) {
      this.emit('push', name, value);
      return;
    }
    const waiter = this.pending.get(stanza.id);
    if (!waiter) return; // an answer after its timeout: nothing waits for it any more
    this.pending.delete(stanza.id);
    clearTimeout(waiter.timer);
    if (name === 'error') waiter.reject(new GatewayError(value));
    else waiter.resolve({ name, value });
  }

  _onClose(reason) {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
    for (const [, w] of this.pending) {
      clearTimeout(w.timer);
      w.reject(new Error(`connection closed (${reason}) before the answer to ${w.name}`));
    }
    this.pending.clear();
    this.channel = null;
    this.emit('close', { reason });
  }

  _keepalive() {
    if (!this.connected) return;
    if (Date.now() - this.lastReceived > DEAD_AFTER_MS) {
      this.close('gateway silent for 90 s');
      return;
    }
    this.request('ping', { nonce: Date.now() }, { timeoutMs: 60000, retries: 0 }).catch(() => {});
  }
}

module.exports = { GatewayClient, GatewayError, PING_INTERVAL_MS };
