//! Error text for logs and messages: an error with its chain of causes on one line.
//!
//! A leaf module, like [`crate::exit`]: whoever reports an error uses it, and it uses
//! nothing of the crate.

/// Formats an error with its chain of causes: `outer: inner: innermost`.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
