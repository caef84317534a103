// Zero-downtime restart: the guide's example, moved to Steer.
//
//   steer run --listen 127.0.0.1:8000 --workers 4 --status 127.0.0.1:8001 \
//       -- node examples/node/zero-downtime.mjs
//   kill -USR2 <primary pid>           # or: steer restart --status 127.0.0.1:8001
//
// The guide's primary restarts one worker at a time on SIGUSR2: disconnect, fork, wait
// for "listening". Steer does that itself, in the right order: the new generation starts
// and is ready before the old one is asked to drain, and the old one's queued connections
// move to the live workers as it closes its listener. What the worker must do is drain
// well, which the helper does: stop accepting, answer keep-alive requests with
// `Connection: close`, close idle connections only after a grace, then exit.
import http from "node:http";
import steer from "../../contrib/node/steer.js";

const generation = process.env.STEER_WORKER_GENERATION;
const server = http.createServer((req, res) => {
  res.setHeader("X-Steer-Worker", String(worker.slot));
  res.end(`Hello from worker ${worker.slot}, generation ${generation}\n`);
});
const worker = steer.serve(server);
