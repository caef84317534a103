// Hello per worker: the cluster guide's "Basic Example", moved to Steer.
//
//   steer run --listen 127.0.0.1:8000 --workers 4 -- node examples/node/hello.mjs
//   curl http://127.0.0.1:8000/        # Hello from worker 2 (pid 1234)
//
// The cluster module's primary half (`cluster.fork()` per CPU, `cluster.on('exit')` to
// fork again) has no counterpart here: `--workers` forks, and Steer restarts a worker
// that dies, with backoff, and gives up on a slot that crash-loops.
import http from "node:http";
import steer from "../../contrib/node/steer.js";

const server = http.createServer((req, res) => {
  res.setHeader("X-Steer-Worker", String(worker.slot));
  res.end(`Hello from worker ${worker.slot} (pid ${process.pid})\n`);
});
const worker = steer.serve(server);
worker.on("ready", () => console.log(`worker ${worker.slot} (pid ${process.pid}) started`));
