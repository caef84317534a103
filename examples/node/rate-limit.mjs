// A request-level rate limiter per client, exact, in one worker's memory: no Redis.
//
//   steer run --listen 127.0.0.1:8000 --workers 4 --balance hash \
//       -- node examples/node/rate-limit.mjs
//   for i in $(seq 12); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:8000/; done
//   # 200 x 10, then 429 429: the 11th request in a minute is refused
//
// The cluster guide limits requests "across workers" with a sorted set per client IP in
// Redis, checked on every request: a round trip per request and a Redis to run. With
// `--balance hash` the kernel sends every connection of a client address to one worker
// (a consistent hash of the address, in Steer's program), so the count that worker keeps
// in memory is every request the client made: the limit is exact for that client. It
// starts again from zero only when that worker restarts, or, for the clients that move,
// when the worker count changes. Under round-robin each worker would count a share, and a
// client would get up to N times the limit.
//
// Connection floods are better refused before any worker wakes: `--client-conn-rate`
// (docs/operations.md, "Per-client connection limits"). This limits requests, also those
// sent over one keep-alive connection.
import http from "node:http";
import steer from "../../contrib/node/steer.js";

const LIMIT = Number(process.env.RATE_LIMIT ?? 10);
const WINDOW_MS = Number(process.env.RATE_WINDOW_MS ?? 60_000);

// Client address -> times of its requests within the window (a sliding log, as the
// guide's sorted set), oldest first.
const seen = new Map();

function allow(client, now) {
  const times = (seen.get(client) ?? []).filter((t) => now - t < WINDOW_MS);
  const ok = times.length < LIMIT;
  if (ok) times.push(now);
  seen.set(client, times);
  return { ok, count: times.length };
}

// Forget clients whose window has passed, so the map stays as small as the active set.
setInterval(() => {
  const now = Date.now();
  for (const [client, times] of seen) {
    if (times.every((t) => now - t >= WINDOW_MS)) seen.delete(client);
  }
}, WINDOW_MS).unref();

const server = http.createServer((req, res) => {
  const client = req.socket.remoteAddress;
  const { ok, count } = allow(client, Date.now());
  res.setHeader("X-Steer-Worker", String(worker.slot));
  res.setHeader("Content-Type", "application/json");
  res.setHeader("RateLimit-Limit", String(LIMIT));
  if (!ok) {
    res.statusCode = 429;
    res.setHeader("Retry-After", String(Math.ceil(WINDOW_MS / 1000)));
  }
  res.end(JSON.stringify({ client, allowed: ok, count, worker: worker.slot }));
});
const worker = steer.serve(server);
