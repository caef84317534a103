//! Fuzzes a config file, parsed, validated and printed back as `steer check` does
//! (`steer::fuzzing::config_toml`, where the invariants are).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| steer::fuzzing::config_toml(data));
