'use strict';
// Steer worker helper for Node.js: no dependencies, Node 18.2 or newer.
//
// Under `steer run -- node app.js` each worker process gets its listening socket as fd 3
// and the primary's IPC channel as NODE_CHANNEL_FD, so Node's own `process.send` and
// `process.on('message')` speak Steer's protocol (docs/ipc.md): one JSON object a line,
// `{"v": 1, "type": ...}`. This module does the parts every worker needs:
//
// - listens on fd 3 (or on a port when started without Steer, for development);
// - says `ready` with `heartbeats: true` once the server listens, then answers each
//   `ping` from the event loop, so a loop that blocks stops answering and Steer replaces
//   the worker (interval + timeout);
// - `send(to, data)` and the `message` event, for messages between workers;
// - drains on SIGTERM, on the primary's `drain` message, or when the primary is gone:
//   stops accepting (the queue moves to the other workers), answers keep-alive requests
//   with `Connection: close`, closes idle connections after a short grace, and exits 0
//   once every connection is done;
// - under Steer, ignores the primary's control signals (SIGHUP, SIGUSR1, SIGUSR2,
//   SIGTTIN, SIGTTOU, SIGWINCH) that have no listener of the application's, so that a
//   signal sent to every process of the service (`systemctl kill` without
//   `--kill-whom=main`) reaches only the primary's meaning. Their defaults would end the
//   worker (SIGHUP, SIGUSR2), stop it (SIGTTIN, SIGTTOU) or open Node's inspector
//   (SIGUSR1).
//
// Node's own `server.close()` (since Node 19) closes idle keep-alive connections at once,
// without a word to the client. A client that was sending its next request on one right
// then gets a reset or an empty reply: that is where keep-alive clients see errors on a
// rolling restart. The grace here closes idle connections only after they had time to be
// told `Connection: close`.

const { EventEmitter } = require('node:events');
const net = require('node:net');

const PROTOCOL_VERSION = 1;
const LISTEN_FD = 3;
const DEFAULT_GRACE_MS = 2000;
// The most bytes one message may have on the channel: the JSON line Node writes, without
// its newline (docs/ipc.md). The primary treats a longer one as a protocol violation and
// replaces the worker, so `send` refuses it instead.
const MAX_MESSAGE_BYTES = 64 * 1024;
// What the primary does on these, a worker must not do too (see the top of this file).
const CONTROL_SIGNALS = ['SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGTTIN', 'SIGTTOU', 'SIGWINCH'];

// One worker process's link to Steer. Make it with `serve()`.
class Worker extends EventEmitter {
  constructor(server, options = {}) {
    super();
    const env = process.env;
    /** Slot index, 0..N-1, stable across restarts; null without Steer. */
    this.slot = numberOrNull(env.STEER_WORKER_SLOT);
    /** 1, 2, ... per replacement of the slot; null without Steer. */
    this.generation = numberOrNull(env.STEER_WORKER_GENERATION);
    /** Unique over the primary's life; null without Steer. */
    this.id = numberOrNull(env.STEER_WORKER_ID);
    /** Whether the primary's IPC channel is there (process.send exists). */
    this.supervised = typeof process.send === 'function';
    /** Reported with every heartbeat, shown per slot in Steer's /status. */
    this.counters = { accepted: 0, active: 0, requests: 0 };
    this.draining = false;
    this.server = server;
    this.graceMs = options.graceMs ?? DEFAULT_GRACE_MS;
    this.exitOnDrained = options.exit ?? true;
    this._inFlight = new Set();
    this._track(server);
    if (this.supervised) {
      process.on('message', (message) => this._onMessage(message));
      // The primary is gone: nobody supervises this process any more.
      process.on('disconnect', () => this.drain('the primary is gone'));
    }
    process.on('SIGTERM', () => this.drain('SIGTERM'));
    if (activated() || env.STEER_IPC_FD !== undefined) ignoreControlSignals();
  }

  /**
   * Sends `data` (any JSON value) through the primary: `to` is 'all' (every other
   * worker), a slot number, or 'primary' (the primary's message hook, and its debug log).
   * Returns false, and sends nothing, when there is no channel or the message is over
   * Steer's limit (65,536 bytes as a JSON line, `data` and the envelope together); also
   * false when Node's channel is backed up (the message is sent later, as with
   * `process.send`).
   */
  send(to, data) {
    let recipient;
    if (to === 'all' || to === 'primary') recipient = to;
    else if (Number.isInteger(to) && to >= 0) recipient = { slot: to };
    else throw new TypeError(`send: "to" must be 'all', 'primary' or a slot number, not ${to}`);
    return this._send({ type: 'user', to: recipient, data: data === undefined ? null : data });
  }

  /**
   * Stops accepting, tells keep-alive clients `Connection: close`, closes idle
   * connections after the grace, and (unless `exit: false`) exits 0 when every connection
   * is done. Runs once; SIGTERM and the primary's `drain` both lead here.
   */
  drain(why = 'drain') {
    if (this.draining) return;
    this.draining = true;
    this.emit('drain', why);
    for (const res of this._inFlight) closeAfter(res);
    const finished = () => {
      this.emit('drained');
      if (this.exitOnDrained) process.exit(0);
    };
    if (this.server.listening) {
      // net.Server's close, not http.Server's: that one would close idle keep-alive
      // connections right now (see the top of this file). This stops accepting; the
      // callback runs once the last connection has closed.
      net.Server.prototype.close.call(this.server, finished);
    } else {
      finished();
      return;
    }
    const closeIdle = () => {
      if (typeof this.server.closeIdleConnections === 'function') {
        this.server.closeIdleConnections();
      }
    };
    // After the grace, idle connections go. One that turns idle later closes itself if
    // its response said `Connection: close`; one whose response had started before the
    // drain could not be told, and is closed once it is idle.
    setTimeout(() => {
      closeIdle();
      setInterval(closeIdle, 250).unref();
    }, this.graceMs).unref();
  }

  _track(server) {
    server.on('connection', (socket) => {
      this.counters.accepted += 1;
      this.counters.active += 1;
      socket.once('close', () => {
        this.counters.active -= 1;
      });
    });
    // Ahead of the application's handler, which may answer at once: the header must be
    // set before the response starts.
    server.prependListener('request', (req, res) => {
      this.counters.requests += 1;
      if (this.draining) {
        closeAfter(res);
        return;
      }
      this._inFlight.add(res);
      res.once('close', () => this._inFlight.delete(res));
    });
    server.once('listening', () => {
      this._send({ type: 'ready', heartbeats: true });
      this.emit('ready');
    });
  }

  _onMessage(message) {
    if (message === null || typeof message !== 'object' || message.v !== PROTOCOL_VERSION) {
      return;
    }
    switch (message.type) {
      case 'ping':
        // Answered here, on the event loop: a loop that blocks stops answering.
        this._send({ type: 'pong', seq: message.seq, counters: this.counters });
        break;
      case 'drain':
        this.drain('drain message');
        break;
      case 'user':
        this.emit('message', message.data, message.from ?? null);
        break;
      default:
        // Newer primaries may send types this version does not know.
        break;
    }
  }

  _send(message) {
    if (!this.supervised || !process.connected) return false;
    message.v = PROTOCOL_VERSION;
    // The same line Node writes (`JSON.stringify`, then a newline), measured before
    // anything is written: a part of it would be no better.
    if (Buffer.byteLength(JSON.stringify(message)) > MAX_MESSAGE_BYTES) return false;
    // The callback takes write errors (the primary gone), which would otherwise be
    // thrown as an 'error' event on `process`.
    return process.send(message, undefined, {}, () => {});
  }
}

// A listener that does nothing, on each control signal the application does not listen
// to itself: the signal is then handled (and does nothing) instead of taking its default.
// Node's signal listeners do not keep the process alive.
function ignoreControlSignals() {
  for (const signal of CONTROL_SIGNALS) {
    if (process.listenerCount(signal) === 0) process.on(signal, ignoreSignal);
  }
}

function ignoreSignal() {}

// Asks the client to close the connection after this response, unless it is too late.
function closeAfter(res) {
  if (!res.headersSent) res.setHeader('Connection', 'close');
}

function numberOrNull(text) {
  if (text === undefined || text === '') return null;
  const n = Number(text);
  return Number.isInteger(n) ? n : null;
}

/**
 * Whether this process was given a listening socket as fd 3 (systemd's socket activation,
 * which `steer run` follows): LISTEN_FDS=1 and LISTEN_PID naming this process.
 */
function activated() {
  return process.env.LISTEN_FDS === '1' && process.env.LISTEN_PID === String(process.pid);
}

/**
 * Serves `server` (an `http.Server`, or any `net.Server`) as a Steer worker: listens on
 * fd 3 when Steer started this process, else on `options.port` (default: $PORT, else
 * 8000) for a run without Steer. Options: `graceMs` (how long idle connections are kept
 * once draining, default 2000), `exit` (exit 0 once drained, default true). Returns the
 * `Worker`: its `message`, `ready`, `drain` and `drained` events, and `send(to, data)`.
 */
function serve(server, options = {}) {
  const worker = new Worker(server, options);
  if (activated()) {
    server.listen({ fd: LISTEN_FD });
  } else {
    server.listen(options.port ?? Number(process.env.PORT || 8000));
  }
  return worker;
}

module.exports = { serve, activated, Worker, PROTOCOL_VERSION, MAX_MESSAGE_BYTES };
