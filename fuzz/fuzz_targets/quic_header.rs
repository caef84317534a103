//! Fuzzes the routing of a datagram on a QUIC listener by its connection ID
//! (`steer::fuzzing::quic_header`, where the invariants are).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| steer::fuzzing::quic_header(data));
