//! # steer-bench: Steer's kernel steering against userspace balancing, side by side
//!
//! Two parts:
//!
//! - [`load`]: a closed-loop HTTP/1.1 load generator (`mio`, a few threads, no external
//!   binary): keep-alive or new-connection mode, bounded by a duration or a request count,
//!   latency in an HDR histogram, per-worker counts from the `X-Steer-Worker` header, errors
//!   by kind, many loopback source addresses for the `hash` policy.
//! - [`suite`]: the benchmark `cargo xtask bench` runs: every balancing policy and baseline
//!   (and Node cluster and nginx when present) through the same scenarios in interleaved
//!   rounds, reported as medians with min-max in `target/bench/report.{md,json,svg}`.
//!
//! The binary `steer-bench` exposes both: `steer-bench load ...` and `steer-bench suite ...`.
//! Absolute figures on a shared machine are noise; the suite reports ratios measured in
//! the same run, and nothing here is a pass/fail test of speed.

pub mod load;
pub mod suite;
