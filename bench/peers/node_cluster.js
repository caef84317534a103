// Node's cluster module serving bench/peers/app.js, for `cargo xtask bench`.
// Environment: PORT, WORKERS, SCHED=rr|none.
//
// SCHED=rr (Node's default on Linux): the primary accepts every connection and passes it
// to a worker round-robin over IPC. SCHED=none: the workers share one listening socket
// and accept from it themselves.
//
// SIGUSR2 restarts the workers one after the other with the rolling pattern of Node's
// cluster guide, in the zero-downtime order: fork the new worker (same SLOT), wait for
// it to be `listening`, then disconnect the old one (app.js then finishes what is in
// flight and exits; it is killed if still there after 10 s), and go on to the next slot
// once the old one has exited. A SIGUSR2 during a restart is queued. A worker that dies
// otherwise is forked again.
'use strict';
const cluster = require('node:cluster');
const path = require('node:path');

const workers = Number(process.env.WORKERS || 2);
const KILL_AFTER_MS = 10000;
// Must be set before the first fork.
cluster.schedulingPolicy = process.env.SCHED === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;
cluster.setupPrimary({ exec: path.join(__dirname, 'app.js') });

// slot -> its current worker.
const slots = new Map();
let stopping = false;
let rolling = false;
let pending = 0;

function fork(slot) {
  const worker = cluster.fork({ SLOT: String(slot) });
  slots.set(slot, worker);
  worker.on('exit', () => {
    if (!stopping && !worker.exitedAfterDisconnect && slots.get(slot) === worker) fork(slot);
  });
  return worker;
}

function roll(slot) {
  if (slot >= workers) {
    console.log('rolling restart done');
    rolling = false;
    if (pending > 0) {
      pending -= 1;
      startRoll();
    }
    return;
  }
  const old = slots.get(slot);
  const fresh = fork(slot);
  fresh.once('listening', () => {
    const kill = setTimeout(() => old.process.kill('SIGKILL'), KILL_AFTER_MS);
    old.once('exit', () => {
      clearTimeout(kill);
      roll(slot + 1);
    });
    old.disconnect();
  });
}

function startRoll() {
  if (rolling) {
    pending += 1;
    return;
  }
  rolling = true;
  roll(0);
}

let listening = 0;
cluster.on('listening', () => {
  listening += 1;
  if (listening === workers) {
    console.log(`node cluster ready: ${workers} workers, sched ${process.env.SCHED || 'rr'}`);
  }
});
for (let slot = 0; slot < workers; slot++) fork(slot);

process.on('SIGUSR2', startRoll);
const stop = () => {
  stopping = true;
  for (const worker of slots.values()) worker.process.kill('SIGTERM');
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
