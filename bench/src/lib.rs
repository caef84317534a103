//! # steer-bench: Steer's kernel steering against userspace balancing, side by side
//!
//! The parts:
//!
//! - [`load`]: a closed-loop HTTP/1.1 load generator (`mio`, a few threads, no external
//!   binary): keep-alive or new-connection mode, bounded by a duration or a request count,
//!   latency in an HDR histogram, per-worker counts from the `X-Steer-Worker` header, errors
//!   by kind, many loopback source addresses for the `hash` policy.
//! - [`suite`]: the benchmark `cargo xtask bench` runs: every balancing policy and baseline
//!   (and Node cluster and nginx when present) through the same scenarios in interleaved
//!   rounds, reported as medians with min-max in `target/bench/report.{md,json,svg}`, with
//!   the server's CPU time per request and its memory.
//! - [`datagram`]: the UDP load generator: many client sockets (flows) sending numbered
//!   datagrams, closed loop (a window per flow) or open loop (a rate), `recvmmsg` and
//!   `sendmmsg`; answered datagrams per second, loss, latency, who answered each flow.
//! - [`quic`]: the QUIC load (quinn + h3): handshakes per second, each from a fresh socket,
//!   and requests per second on established connections.
//! - [`profile`]: where one new connection's microseconds go (`perf`), by side and by
//!   system call, and the steering program's own cost; `target/bench/perf.md`.
//!
//! The binary `steer-bench` exposes all three: `steer-bench load ...`, `steer-bench suite
//! ...` and `steer-bench profile ...`.
//! Absolute figures on a shared machine are noise; the suite reports ratios measured in
//! the same run, and nothing here is a pass/fail test of speed.

pub mod datagram;
pub mod load;
pub mod profile;
pub mod quic;
pub mod suite;
