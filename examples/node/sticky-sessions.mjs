// Sticky sessions: a client keeps reaching the worker that holds its session.
//
//   steer run --listen 127.0.0.1:8000 --workers 4 --balance hash \
//       -- node examples/node/sticky-sessions.mjs
//   curl http://127.0.0.1:8000/visit   # visits: 1, 2, 3 ... from the same worker
//
// The interview questions' "sticky sessions (IP-based routing)" is a primary that reads
// each connection's address and hands the socket to `workers[hash(ip) % n]`. With
// `--balance hash` the kernel does it: the steering program picks the worker from a hash
// of the client's address (consistent, so changing the worker count moves few clients),
// and no connection passes through the primary. Sessions in a worker's memory still end
// when that worker restarts; keep what must survive in a shared store.
import http from "node:http";
import steer from "../../contrib/node/steer.js";

const visits = new Map();
const server = http.createServer((req, res) => {
  const client = req.socket.remoteAddress;
  const count = (visits.get(client) ?? 0) + 1;
  visits.set(client, count);
  res.setHeader("X-Steer-Worker", String(worker.slot));
  res.setHeader("Content-Type", "application/json");
  res.end(JSON.stringify({ client, visits: count, worker: worker.slot }));
});
const worker = steer.serve(server);
