// Worker communication: the guide's broadcast example, moved to Steer, with no library.
//
//   steer run --listen 127.0.0.1:8000 --workers 3 -- node examples/node/broadcast.mjs
//   curl http://127.0.0.1:8000/hello   # this worker tells every other worker
//   curl http://127.0.0.1:8000/inbox   # what this worker has heard from the others
//
// Steer gives a Node worker its IPC channel as NODE_CHANNEL_FD, so `process.send` and
// `process.on("message")` talk to the primary as they do under the cluster module. The
// primary relays: a message `to: "all"` reaches every other worker (never the sender),
// `to: {slot: N}` reaches one; each arrives with `from` set to the sender's slot. The
// guide's primary loop (`for (const w of workers) w.send(...)`) is what the primary does
// for you. This file uses the protocol of docs/ipc.md directly, to show there is nothing
// more to it; contrib/node/steer.js wraps the same in `send(to, data)`.
import http from "node:http";

const slot = Number(process.env.STEER_WORKER_SLOT);
const inbox = [];

process.on("message", (message) => {
  if (message.v !== 1) return;
  if (message.type === "ping") {
    // Heartbeats, answered from the event loop (see health-check.mjs).
    process.send({ v: 1, type: "pong", seq: message.seq });
  } else if (message.type === "user") {
    inbox.push({ from: message.from, data: message.data });
  }
});

const server = http.createServer((req, res) => {
  res.setHeader("X-Steer-Worker", String(slot));
  res.setHeader("Content-Type", "application/json");
  if (req.url === "/hello") {
    const data = { greeting: `hello from ${slot}`, url: req.url, at: Date.now() };
    process.send({ v: 1, type: "user", to: "all", data });
    res.end(JSON.stringify({ sent: data }));
  } else if (req.url === "/inbox") {
    res.end(JSON.stringify(inbox));
  } else {
    res.statusCode = 404;
    res.end("{}");
  }
});

// fd 3 is the listening socket Steer made for this worker.
server.listen({ fd: 3 }, () => {
  process.send({ v: 1, type: "ready", heartbeats: true });
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
