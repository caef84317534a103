//! Log setup: one line per lifecycle event, as text or JSON, on stderr.
//!
//! The primary never waits for its log: its lines go through a bounded queue to a writer
//! thread ([`sink`]), so a stalled stderr (a full journald pipe, a terminal on hold)
//! cannot stop supervision. What the queue cannot take is dropped and counted
//! ([`dropped_lines`], shown in `/status` and `/metrics`). Workers' output, tagged by the
//! primary's output reader, goes through the same queue, each worker with a queue of its
//! own, so a flooding worker cannot crowd out the primary's lines.
//!
//! Workers inherit the primary's choice through `STEER_LOG_FORMAT` and `STEER_LOG_LEVEL`
//! so their lines match the primary's; they write to their stderr, which the primary
//! reads and tags (or, with `--worker-output inherit`, is the primary's own).

pub(crate) mod sink;

use std::sync::OnceLock;
use std::time::Duration;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;
use sink::{Origin, Sink};

/// Environment variable carrying the log format to workers.
pub(crate) const ENV_LOG_FORMAT: &str = "STEER_LOG_FORMAT";
/// Environment variable carrying the verbosity to workers.
pub(crate) const ENV_LOG_LEVEL: &str = "STEER_LOG_LEVEL";

/// How long the primary waits, at exit, for its queued lines to be written.
const EXIT_PATIENCE: Duration = Duration::from_secs(2);

/// The primary's writer to stderr, once [`init`] ran.
static SINK: OnceLock<Sink> = OnceLock::new();

/// The primary's queue to stderr, if [`init`] set one up (workers have none).
pub(crate) fn sink() -> Option<&'static Sink> {
    SINK.get()
}

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
    if SINK.get().is_some() {
        return;
    }
    let Ok(sink) = Sink::start(std::io::stderr()) else {
        // No thread for the writer: write straight to stderr, as a worker does.
        install(format, verbosity, std::io::stderr);
        return;
    };
    let sink = SINK.get_or_init(|| sink);
    install(format, verbosity, PrimaryLog(sink));
}

/// Lines dropped so far because stderr could not keep up.
pub fn dropped_lines() -> u64 {
    SINK.get().map_or(0, Sink::primary_dropped)
}

/// Writes out what is queued, waiting for stderr at most a moment: a sink nobody reads
/// must not keep the primary from exiting.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush(EXIT_PATIENCE);
    }
}

/// The primary's own lines, as tracing's writer: one event is one line on the queue.
#[derive(Clone, Copy)]
struct PrimaryLog(&'static Sink);

/// One event's bytes, queued whole when tracing is done writing them.
struct PrimaryLine {
    sink: &'static Sink,
    line: Vec<u8>,
}

impl<'a> MakeWriter<'a> for PrimaryLog {
    type Writer = PrimaryLine;
    fn make_writer(&'a self) -> PrimaryLine {
        PrimaryLine {
            sink: self.0,
            line: Vec::with_capacity(256),
        }
    }
}

impl std::io::Write for PrimaryLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for PrimaryLine {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.sink
                .push(Origin::Primary, std::mem::take(&mut self.line));
        }
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
