//! Fuzzes a client's request head, read whole and in pieces by the demo's parser
//! (`steer::fuzzing::http_head`, where the invariants are).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| steer::fuzzing::http_head(data));
