// The memory threshold: a worker that grows past a limit is replaced gracefully.
//
//   steer run --listen 127.0.0.1:8000 --workers 2 --max-memory 200MiB \
//       -- node examples/node/memory-threshold.mjs
//   curl 'http://127.0.0.1:8000/grow?mib=64'   # this worker keeps 64 MiB more
//
// The guide's primary asks each worker every 30 s to check its own `process.memoryUsage()`
// and exit when it is over; PM2's `max_memory_restart: "300M"` does the same from outside.
// Steer reads each worker's resident memory every --health-interval and, once it passes
// --max-memory, starts a replacement and drains the old worker only when the new one is
// ready: nothing is refused meanwhile, and the worker needs no code for it.
import http from "node:http";
import steer from "../../contrib/node/steer.js";

const kept = [];
const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://steer");
  res.setHeader("X-Steer-Worker", String(worker.slot));
  if (url.pathname === "/grow") {
    const mib = Number(url.searchParams.get("mib") ?? 16);
    // Filled, so the pages are resident and count.
    kept.push(Buffer.alloc(mib * 1024 * 1024, 1));
  }
  const rss = Math.round(process.memoryUsage().rss / 1024 / 1024);
  res.end(`worker ${worker.slot} (pid ${process.pid}) holds ${rss} MiB\n`);
});
const worker = steer.serve(server);
