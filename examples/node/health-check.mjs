// Health checks: a worker whose event loop blocks is replaced.
//
//   steer run --listen 127.0.0.1:8000 --workers 2 --health-interval 1s --health-timeout 3s \
//       -- node examples/node/health-check.mjs
//   curl 'http://127.0.0.1:8000/block?ms=60000'   # that worker's loop is stuck
//   (`&slot=N` blocks only if the request reached slot N, and answers at once elsewhere)
//   # within interval + timeout Steer takes it out of steering and starts a replacement
//
// The interview questions' health tracker (a timer in the primary, `{type: "health"}`
// messages, a count of missed answers) is built in: the primary pings every worker each
// --health-interval, and a worker that declared heartbeats and does not answer for
// --health-timeout is hung. The helper answers each ping from `process.on("message")`,
// on the event loop, so a blocked loop stops answering; an answer from a timer in a
// worker thread would hide exactly the failure the check exists to catch.
import http from "node:http";
import steer from "../../contrib/node/steer.js";

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://steer");
  res.setHeader("X-Steer-Worker", String(worker.slot));
  const here = url.searchParams.get("slot") ?? String(worker.slot);
  if (url.pathname === "/block" && here === String(worker.slot)) {
    const ms = Number(url.searchParams.get("ms") ?? 10000);
    console.log(`${new Date().toISOString()} worker ${worker.slot}: blocking the event loop for ${ms} ms`);
    const until = Date.now() + ms;
    while (Date.now() < until) {
      // A CPU-bound bug, or a synchronous call that never returns.
    }
  }
  res.end(`worker ${worker.slot} (pid ${process.pid}) is fine\n`);
});
const worker = steer.serve(server);
