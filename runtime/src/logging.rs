//! Log setup: one line per lifecycle event, as text or JSON, on stderr.
//!
//! The primary never waits for its log: its lines go through a bounded queue to a writer
//! thread (tracing-appender's non-blocking writer, lossy), so a stalled stderr (a full
//! journald pipe, a terminal on hold) cannot stop supervision. What the queue cannot take
//! is dropped and counted ([`dropped_lines`], shown in `/status` and `/metrics`).
//!
//! Workers inherit the primary's choice through `STEER_LOG_FORMAT` and `STEER_LOG_LEVEL`
//! so their lines match the primary's; they write directly (a worker stuck on its own
//! stderr is stuck, and its heartbeats say so).

use std::sync::{Mutex, OnceLock};

use tracing::level_filters::LevelFilter;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Environment variable carrying the log format to workers.
pub(crate) const ENV_LOG_FORMAT: &str = "STEER_LOG_FORMAT";
/// Environment variable carrying the verbosity to workers.
pub(crate) const ENV_LOG_LEVEL: &str = "STEER_LOG_LEVEL";

/// Lines the non-blocking writer holds before it drops new ones.
const QUEUED_LINES: usize = 16_384;

/// The writer thread's guard (dropping it flushes) and its drop counter.
static WRITER: OnceLock<(Mutex<Option<WorkerGuard>>, ErrorCounter)> = OnceLock::new();

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

/// Installs the global subscriber for a primary, writing through a non-blocking queue.
/// `RUST_LOG`, when set, overrides the verbosity. Safe to call twice (the second call is
/// ignored). Call [`flush`] before the process exits.
pub fn init(format: LogFormat, verbosity: i8) {
    if WRITER.get().is_some() {
        return;
    }
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("steer-log")
        .finish(std::io::stderr());
    let counter = writer.error_counter();
    let _ = WRITER.set((Mutex::new(Some(guard)), counter));
    install(format, verbosity, writer);
}

/// Lines dropped so far because stderr could not keep up.
pub fn dropped_lines() -> u64 {
    WRITER
        .get()
        .map_or(0, |(_, counter)| counter.dropped_lines() as u64)
}

/// Writes out what is queued and stops the writer thread (waits for stderr, once, at exit).
pub fn flush() {
    if let Some((guard, _)) = WRITER.get()
        && let Ok(mut guard) = guard.lock()
    {
        drop(guard.take());
    }
}

fn install<W>(format: LogFormat, verbosity: i8, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::builder()
        .with_default_directive(level(verbosity).into())
        .from_env_lossy();
    // Colour only for a person at a terminal; files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    // A log line that cannot be written is dropped. By default tracing-subscriber reports
    // it with `eprintln!`, which panics on a closed stderr (EPIPE): a worker whose log
    // pipe's reader went away would crash-loop instead of serving.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let _already_set = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Installs the subscriber a worker inherits from its primary's environment (writing
/// straight to stderr).
pub(crate) fn init_from_env() {
    let format = std::env::var(ENV_LOG_FORMAT)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    let verbosity = std::env::var(ENV_LOG_LEVEL)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    install(format, verbosity, std::io::stderr);
}
