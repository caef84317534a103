//! The process exit statuses every `steer` command shares.
//!
//! A leaf module: the command line, the primary, `steer status` and `steer top` all end
//! with one of these, and none of them reaches into another for it.

/// Exit status for usage and configuration errors: the message names the flag or key and
/// the bad value.
pub const EXIT_USAGE: u8 = 2;

/// Exit status for runtime failures, with a message saying what to do.
pub const EXIT_FAILURE: u8 = 1;
