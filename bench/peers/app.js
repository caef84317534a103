// The Node app of `cargo xtask bench --peers`: one file, served four ways with the same
// worker count (Steer on the Node helper, Node's cluster module in SCHED_RR and
// SCHED_NONE mode through node_cluster.js, PM2 in cluster mode).
//
//   GET /              the hello body, with `X-Steer-Worker: <slot>`
//   GET /block?ms=N    blocks this worker's event loop N ms (at most 10 s), then answers
//
// Under Steer (`steer run -- node app.js`) `steer.serve` listens on the socket Steer made,
// heartbeats and drains. Otherwise it listens on 127.0.0.1:$PORT (the cluster module
// shares the port between the workers) and shuts down the way Node's documentation and
// PM2's tell an app to: on SIGINT or SIGTERM (PM2's reload), or when the cluster primary
// disconnects it (the rolling restart of node_cluster.js), it stops accepting, answers
// what is in flight with `Connection: close`, closes idle keep-alive connections at once
// (what `server.close()` does since Node 19), exits when the last connection is gone, and
// exits anyway after 5 s. It tells PM2 it is ready (`wait_ready`) once it listens.
//
// The worker's name in `X-Steer-Worker`: Steer's slot, node_cluster.js' SLOT, or PM2's
// NODE_APP_INSTANCE; each stays the same across a reload.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const steer = require('../../contrib/node/steer.js');

const underSteer = steer.activated();
const slot = underSteer
  ? process.env.STEER_WORKER_SLOT
  : (process.env.SLOT ?? process.env.NODE_APP_INSTANCE ?? '0');
const body = `hello from worker ${slot} (pid ${process.pid})\n`;
const length = Buffer.byteLength(body);
const MAX_BLOCK_MS = 10000;
const EXIT_AFTER_MS = 5000;
let closing = false;

function block(url) {
  const ms = Math.min(Number(new URL(url, 'http://app').searchParams.get('ms')) || 0, MAX_BLOCK_MS);
  const end = Date.now() + ms;
  while (Date.now() < end) {
    // The event loop is blocked: nothing else runs in this worker.
  }
}

const server = http.createServer((req, res) => {
  if (req.url.startsWith('/block')) block(req.url);
  const headers = {
    'Content-Type': 'text/plain; charset=utf-8',
    'Content-Length': length,
    'X-Steer-Worker': slot,
  };
  if (closing) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});

if (underSteer) {
  steer.serve(server);
} else {
  const sockets = new Set();
  server.on('connection', (socket) => {
    if (closing) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.on('close', () => {
      sockets.delete(socket);
      if (closing && sockets.size === 0) process.exit(0);
    });
  });
  const shutdown = () => {
    if (closing) return;
    closing = true;
    try {
      server.close();
    } catch {
      // The cluster module closed the listening handle already.
    }
    server.closeIdleConnections();
    if (sockets.size === 0) process.exit(0);
    setTimeout(() => process.exit(0), EXIT_AFTER_MS).unref();
  };
  process.on('SIGINT', shutdown);
  process.on('SIGTERM', shutdown);
  if (cluster.isWorker) cluster.worker.on('disconnect', shutdown);
  server.listen(Number(process.env.PORT), '127.0.0.1', () => {
    if (typeof process.send === 'function') process.send('ready');
  });
}
