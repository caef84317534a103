//! Types and constants shared by the kernel side (`steer-ebpf`) and the user side (`steer`).
//!
//! Everything here is `no_std` so the eBPF program can use it; map value types are
//! `#[repr(C)]` so both sides agree on their layout byte for byte.
#![no_std]

/// Most worker slots a cluster may have. Sizes the steering maps; `--workers` above it is
/// a configuration error.
pub const MAX_SLOTS: u32 = 1024;
