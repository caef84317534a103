// Node's cluster module serving the same hello workload as Steer's demo app, for
// `cargo xtask bench`. Environment: PORT, WORKERS, SCHED=rr|none.
//
// SCHED=rr (Node's default on Linux): the primary accepts every connection and passes it
// to a worker round-robin over IPC. SCHED=none: the workers share one listening socket
// and accept from it themselves.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.env.PORT);
const workers = Number(process.env.WORKERS || 2);
// Must be set before the first fork.
cluster.schedulingPolicy = process.env.SCHED === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;

if (cluster.isPrimary) {
  let listening = 0;
  for (let slot = 0; slot < workers; slot++) {
    cluster.fork({ SLOT: String(slot) });
  }
  cluster.on('listening', () => {
    listening += 1;
    if (listening === workers) {
      console.log(`node cluster ready: ${workers} workers, sched ${process.env.SCHED || 'rr'}`);
    }
  });
  const stop = () => {
    for (const id in cluster.workers) {
      cluster.workers[id].process.kill('SIGTERM');
    }
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const slot = process.env.SLOT;
  const body = `hello from worker ${slot} (pid ${process.pid})\n`;
  const length = Buffer.byteLength(body);
  http
    .createServer((req, res) => {
      res.writeHead(200, {
        'Content-Type': 'text/plain; charset=utf-8',
        'Content-Length': length,
        'X-Steer-Worker': slot,
      });
      res.end(body);
    })
    .listen(port, '127.0.0.1');
}
