//! Log setup: one line per lifecycle event, as text or JSON, on stderr.
//!
//! Workers inherit the primary's choice through `STEER_LOG_FORMAT` and `STEER_LOG_LEVEL`
//! so their lines match the primary's.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Environment variable carrying the log format to workers.
pub(crate) const ENV_LOG_FORMAT: &str = "STEER_LOG_FORMAT";
/// Environment variable carrying the verbosity to workers.
pub(crate) const ENV_LOG_LEVEL: &str = "STEER_LOG_LEVEL";

/// Maps `-q`/`-v` counts to a level: -2 error, -1 warn, 0 info, 1 debug, 2+ trace.
pub fn level(verbosity: i8) -> LevelFilter {
    match verbosity {
        i8::MIN..=-2 => LevelFilter::ERROR,
        -1 => LevelFilter::WARN,
        0 => LevelFilter::INFO,
        1 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the verbosity. Safe to
/// call twice (the second call is ignored).
pub fn init(format: LogFormat, verbosity: i8) {
    let filter = EnvFilter::builder()
        .with_default_directive(level(verbosity).into())
        .from_env_lossy();
    // Colour only for a person at a terminal; files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _already_set = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Installs the subscriber a worker inherits from its primary's environment.
pub(crate) fn init_from_env() {
    let format = std::env::var(ENV_LOG_FORMAT)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    let verbosity = std::env::var(ENV_LOG_LEVEL)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    init(format, verbosity);
}
