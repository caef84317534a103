// Graceful shutdown with requests in flight: the guide's example, moved to Steer.
//
//   steer run --listen 127.0.0.1:8000 --workers 2 -- node examples/node/graceful-shutdown.mjs
//   curl 'http://127.0.0.1:8000/slow?ms=3000' & kill -TERM <primary pid>
//   # the slow request still gets its answer; then the workers and the primary exit 0
//
// The guide's primary sends "shutdown" to each worker, waits for the disconnects, and
// kills stragglers after 15 s. Steer's primary does that on SIGTERM (or SIGINT): every
// worker gets SIGTERM and the `drain` message, and SIGKILL after --shutdown-timeout
// (default 30 s). The worker's half is the helper's drain.
import http from "node:http";
import steer from "../../contrib/node/steer.js";

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://steer");
  const ms = Number(url.searchParams.get("ms") ?? 0);
  res.setHeader("X-Steer-Worker", String(worker.slot));
  setTimeout(() => res.end(`done after ${ms} ms by worker ${worker.slot}\n`), ms);
});
const worker = steer.serve(server);
worker.on("drain", (why) => console.log(`worker ${worker.slot}: draining (${why})`));
worker.on("drained", () => console.log(`worker ${worker.slot}: every connection done`));
