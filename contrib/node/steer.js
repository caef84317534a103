'use strict';
// Steer worker helper for Node.js: no dependencies, Node 18.2 or newer.
//
// Under `steer run -- node app.js` each worker process gets one socket per listener as
// fds 3, 4, ... (LISTEN_FDS, LISTEN_FDNAMES) and the primary's IPC channel as
// NODE_CHANNEL_FD, so Node's own `process.send` and `process.on('message')` speak Steer's
// protocol (docs/ipc.md): one JSON object a line, `{"v": 1, "type": ...}`. This module
// does the parts every worker needs:
//
// - `listeners()` names each inherited socket and says what it is (TCP or UDP, IPv4 or
//   IPv6); a server listens on a TCP one (`serve`, `worker.listen`), a `dgram` socket is
//   bound to a UDP one (`worker.udpSocket`); without Steer, on a port, for development;
// - says `ready` with `heartbeats: true` once the server listens, then answers each
//   `ping` from the event loop, so a loop that blocks stops answering and Steer replaces
//   the worker (interval + timeout);
// - `send(to, data)` and the `message` event, for messages between workers;
// - drains on SIGTERM, on the primary's `drain` message, or when the primary is gone:
//   stops accepting (the queue moves to the other workers), answers keep-alive requests
//   with `Connection: close`, closes idle connections after a short grace, reads each UDP
//   socket until it has been quiet for `udpQuietMs` (the primary took it out of steering
//   before the drain, so what is queued there is all that will come), closes it, and
//   exits 0 once every connection is done and every UDP socket closed;
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
const dgram = require('node:dgram');
const fs = require('node:fs');
const net = require('node:net');

const PROTOCOL_VERSION = 1;
// systemd's SD_LISTEN_FDS_START: the first inherited socket.
const LISTEN_FD = 3;
const DEFAULT_GRACE_MS = 2000;
// How long a draining UDP socket must go without a datagram before it is closed. libuv
// reads what is queued as soon as the loop turns, so the queue is empty well within it
// unless the loop is busy answering, and then every datagram restarts the wait.
const DEFAULT_UDP_QUIET_MS = 50;
// The most bytes one message may have on the channel: the JSON line Node writes, without
// its newline (docs/ipc.md). The primary treats a longer one as a protocol violation and
// replaces the worker, so `send` refuses it instead.
const MAX_MESSAGE_BYTES = 64 * 1024;
// What the primary does on these, a worker must not do too (see the top of this file).
const CONTROL_SIGNALS = ['SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGTTIN', 'SIGTTOU', 'SIGWINCH'];

// One worker process's link to Steer. Make it with `serve()` or `worker()`.
class Worker extends EventEmitter {
  constructor(server = null, options = {}) {
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
    /** The first server given (`serve`), or null. */
    this.server = server;
    /** Every TCP server this worker drains. */
    this.servers = [];
    /** Every dgram socket this worker drains. */
    this.udpSockets = [];
    this.graceMs = options.graceMs ?? DEFAULT_GRACE_MS;
    this.udpQuietMs = options.udpQuietMs ?? DEFAULT_UDP_QUIET_MS;
    this.exitOnDrained = options.exit ?? true;
    this._inFlight = new Set();
    this._listening = 0;
    this._readySent = false;
    this._taken = new Set();
    if (server !== null) this._track(server);
    if (this.supervised) {
      process.on('message', (message) => this._onMessage(message));
      // The primary is gone: nobody supervises this process any more.
      process.on('disconnect', () => this.drain('the primary is gone'));
    }
    process.on('SIGTERM', () => this.drain('SIGTERM'));
    if (activated() || env.STEER_IPC_FD !== undefined) ignoreControlSignals();
  }

  /**
   * Makes `server` (an `http.Server`, or any `net.Server`) listen on the inherited TCP
   * socket named `name` (default: the first TCP one), and drains it with the others.
   * Without Steer it listens on `options.port` (default $PORT, else 8000). Returns the
   * server.
   */
  listen(server, name = undefined, options = {}) {
    if (server !== this.server) this._track(server);
    const inherited = activated() ? this._take('tcp', name) : null;
    if (inherited !== null) {
      server.listen({ fd: inherited.fd });
    } else {
      server.listen(options.port ?? Number(process.env.PORT || 8000));
    }
    return server;
  }

  /**
   * A `dgram.Socket` bound to the inherited UDP socket named `name` (default: the first
   * UDP one), `udp4` or `udp6` after its address. Attach `'message'` to it and answer
   * with `socket.send(reply, rinfo.port, rinfo.address)`. On drain it keeps delivering
   * what is queued until it has been quiet for `udpQuietMs`, then it is closed: answer
   * from the `'message'` handler itself, since a `send` after the close fails. Without
   * Steer it is a fresh `udp4` socket bound to `options.port` (default $UDP_PORT, else
   * 8053) on `options.address` (default 127.0.0.1).
   */
  udpSocket(name = undefined, options = {}) {
    const inherited = activated() ? this._take('udp', name) : null;
    const type = inherited !== null && inherited.family === 'IPv6' ? 'udp6' : 'udp4';
    const socket = dgram.createSocket(type);
    this._trackUdp(socket);
    if (inherited !== null) {
      socket.bind({ fd: inherited.fd });
    } else {
      socket.bind(options.port ?? Number(process.env.UDP_PORT || 8053), options.address ?? '127.0.0.1');
    }
    return socket;
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
   * connections after the grace; reads each UDP socket until it is quiet, then closes it;
   * and (unless `exit: false`) exits 0 when every connection is done and every UDP socket
   * closed. Runs once; SIGTERM and the primary's `drain` both lead here.
   */
  drain(why = 'drain') {
    if (this.draining) return;
    this.draining = true;
    this.emit('drain', why);
    for (const res of this._inFlight) closeAfter(res);
    let left = 0;
    const oneDone = () => {
      left -= 1;
      if (left > 0) return;
      this.emit('drained');
      if (this.exitOnDrained) process.exit(0);
    };
    left += 1; // this function's own share, given up at its end
    for (const server of this.servers) {
      if (!server.listening) continue;
      left += 1;
      // net.Server's close, not http.Server's: that one would close idle keep-alive
      // connections right now (see the top of this file). This stops accepting; the
      // callback runs once the last connection has closed.
      net.Server.prototype.close.call(server, oneDone);
    }
    for (const socket of this.udpSockets) {
      left += 1;
      this._closeWhenQuiet(socket, oneDone);
    }
    const closeIdle = () => {
      for (const server of this.servers) {
        if (typeof server.closeIdleConnections === 'function') server.closeIdleConnections();
      }
    };
    // After the grace, idle connections go. One that turns idle later closes itself if
    // its response said `Connection: close`; one whose response had started before the
    // drain could not be told, and is closed once it is idle.
    if (this.servers.length > 0) {
      setTimeout(() => {
        closeIdle();
        setInterval(closeIdle, 250).unref();
      }, this.graceMs).unref();
    }
    oneDone();
  }

  // Closes `socket` once no datagram has come for `udpQuietMs`, then calls `done`. The
  // primary took it out of steering before the drain: nothing new comes, and what is
  // queued is read as fast as the loop turns.
  _closeWhenQuiet(socket, done) {
    const closed = () => done();
    if (socket._steerClosed) {
      closed();
      return;
    }
    socket._steerLast = Date.now();
    const check = () => {
      if (socket._steerClosed) {
        closed();
        return;
      }
      const quietFor = Date.now() - socket._steerLast;
      if (quietFor < this.udpQuietMs) {
        setTimeout(check, this.udpQuietMs - quietFor);
        return;
      }
      socket.close(closed);
    };
    setTimeout(check, this.udpQuietMs);
  }

  // The inherited socket of `kind` named `name` (or the first of that kind not taken
  // yet); throws when there is none, as listening on a port of its own under Steer
  // would serve nobody.
  _take(kind, name) {
    const found = listeners().find(
      (l) => l.kind === kind && !this._taken.has(l.fd) && (name === undefined || l.name === name),
    );
    if (found === undefined) {
      const which = name === undefined ? 'left' : `named ${name}`;
      throw new Error(`steer: no inherited ${kind.toUpperCase()} socket ${which}`);
    }
    this._taken.add(found.fd);
    return found;
  }

  _track(server) {
    this.servers.push(server);
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
    this._awaitListening(server);
  }

  _trackUdp(socket) {
    this.udpSockets.push(socket);
    // Ahead of the application's handler: the drain measures quiet from here.
    socket.prependListener('message', () => {
      socket._steerLast = Date.now();
    });
    socket.once('close', () => {
      socket._steerClosed = true;
    });
    this._awaitListening(socket);
  }

  // `ready` goes once every server and socket made so far listens: an app makes them all
  // in its first turn, and 'listening' comes on a later one.
  _awaitListening(handle) {
    this._listening += 1;
    handle.once('listening', () => {
      this._listening -= 1;
      if (this._listening > 0 || this._readySent) return;
      this._readySent = true;
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
 * Whether this process was given sockets as fds 3, 4, ... (systemd's socket activation,
 * which `steer run` follows): LISTEN_FDS of at least 1, and LISTEN_PID naming this
 * process.
 */
function activated() {
  const count = Number(process.env.LISTEN_FDS);
  return Number.isInteger(count) && count >= 1 && process.env.LISTEN_PID === String(process.pid);
}

// The family of each UDP socket of this network namespace, by inode, from /proc/net:
// Node cannot ask a socket for its type, and `dgram` must be told udp4 or udp6. (The TCP
// tables are not read: on a busy host they hold every connection, 100,000 lines and more,
// and `server.listen({fd})` needs no family.)
function udpFamilies() {
  const families = new Map();
  for (const [file, family] of [
    ['udp', 'IPv4'],
    ['udp6', 'IPv6'],
  ]) {
    let text;
    try {
      text = fs.readFileSync(`/proc/net/${file}`, 'latin1');
    } catch {
      continue; // no IPv6 in this kernel
    }
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
      if (fields.length > 9) families.set(fields[9], family);
    }
  }
  return families;
}

/**
 * The sockets Steer (or systemd) passed to this process, in order: `{name, kind, family,
 * fd}` each, with `kind` 'udp' (a bound UDP socket, `family` 'IPv4' or 'IPv6') or 'tcp'
 * (any other socket: Steer passes listening TCP sockets; `family` null), or null for an
 * fd that is not an open socket; `name` from LISTEN_FDNAMES (`--listen NAME=...`;
 * 'unknown' when it is not set). Empty when the process was given none (LISTEN_PID is not
 * its pid).
 */
function listeners() {
  if (!activated()) return [];
  const count = Number(process.env.LISTEN_FDS);
  const names = (process.env.LISTEN_FDNAMES ?? '').split(':');
  const families = udpFamilies();
  const found = [];
  for (let i = 0; i < count; i += 1) {
    const fd = LISTEN_FD + i;
    let inode = null;
    try {
      inode = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/self/fd/${fd}`))?.[1] ?? null;
    } catch {
      // not open
    }
    const family = inode === null ? undefined : families.get(inode);
    found.push({
      name: names.length === count ? names[i] : 'unknown',
      kind: inode === null ? null : family === undefined ? 'tcp' : 'udp',
      family: family ?? null,
      fd,
    });
  }
  return found;
}

/**
 * Makes a `Worker` with no server yet: add TCP servers with `worker.listen(server, name)`
 * and UDP sockets with `worker.udpSocket(name)`. Options as `serve`'s, and `udpQuietMs`
 * (how long a draining UDP socket must be quiet before it is closed, default 50).
 */
function worker(options = {}) {
  return new Worker(null, options);
}

/**
 * Serves `server` (an `http.Server`, or any `net.Server`) as a Steer worker: listens on
 * the inherited TCP socket named `options.listener` (default: the first TCP one) when
 * Steer started this process, else on `options.port` (default: $PORT, else 8000) for a
 * run without Steer. Options: `graceMs` (how long idle connections are kept once
 * draining, default 2000), `udpQuietMs` (see `worker`), `exit` (exit 0 once drained,
 * default true). Returns the `Worker`: its `message`, `ready`, `drain` and `drained`
 * events, `send(to, data)`, and `udpSocket(name)` for the UDP listeners.
 */
function serve(server, options = {}) {
  const made = new Worker(server, options);
  made.listen(server, options.listener, options);
  return made;
}

module.exports = {
  serve,
  worker,
  listeners,
  activated,
  Worker,
  PROTOCOL_VERSION,
  MAX_MESSAGE_BYTES,
};
