//! Fuzzes an IPC datagram, decoded as the primary and workers decode it
//! (`steer::fuzzing::ipc_message`, where the invariants are).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| steer::fuzzing::ipc_message(data));
