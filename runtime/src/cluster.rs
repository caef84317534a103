//! [`Cluster`]: the library entry point. The same executable is primary and worker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::config::{LogFormat, Parsed, Settings, StatusAddr, WorkerCount};
use crate::primary::{Control, Hooks, WorkerProgram};
use crate::worker::{Worker, env};

/// A cluster of worker processes running the closure given to [`ClusterBuilder::run`].
#[derive(Debug)]
pub struct Cluster;

impl Cluster {
    /// Starts describing a cluster. Defaults are those of `steer run`.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// True in a worker process started by a Steer primary.
    pub fn is_worker() -> bool {
        std::env::var_os(env::ROLE).is_some()
    }
}

/// Builder for a [`Cluster`]; every setting has the meaning of its `steer run` flag.
#[derive(Debug, Default)]
pub struct ClusterBuilder {
    settings: Settings,
    config_file: Option<PathBuf>,
    log_format: Option<LogFormat>,
    verbosity: i8,
    hooks: Hooks,
}

impl ClusterBuilder {
    /// `--listen ADDR`: the one TCP address every worker binds (replacing any listeners
    /// set before).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.settings.listen = Some(vec![crate::config::Listener::tcp(addr)]);
        self
    }

    /// One more `--listen`: a listener every worker serves besides those set before (the
    /// first call replaces the default `127.0.0.1:8000`). Workers find its socket by its
    /// name ([`crate::Worker::tcp_listener`], [`crate::Worker::udp_socket`]).
    pub fn listener(mut self, listener: crate::config::Listener) -> Self {
        self.settings
            .listen
            .get_or_insert_with(Vec::new)
            .push(listener);
        self
    }

    /// `--workers N`.
    pub fn workers(mut self, n: usize) -> Self {
        self.settings.workers = Some(WorkerCount::Fixed(n));
        self
    }

    /// `--status`: serve `/status` and `/metrics` here.
    pub fn status(mut self, addr: SocketAddr) -> Self {
        self.settings.status = Some(Parsed(StatusAddr(addr)));
        self
    }

    /// `--config`: a TOML file read first; settings made on the builder win.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// `--shutdown-timeout`.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.shutdown_timeout = Some(Parsed(timeout));
        self
    }

    /// `--max-restarts` and `--restart-window`.
    pub fn max_restarts(mut self, n: u32, window: Duration) -> Self {
        self.settings.max_restarts = Some(n);
        self.settings.restart_window = Some(Parsed(window));
        self
    }

    /// `--balance`.
    pub fn balance(mut self, balance: crate::config::Balance) -> Self {
        self.settings.balance = Some(Parsed(balance));
        self
    }

    /// `--health-interval` and `--health-timeout`: how often workers are pinged, and how
    /// long one may stay silent before it is declared hung.
    pub fn health(mut self, interval: Duration, timeout: Duration) -> Self {
        self.settings.health_interval = Some(Parsed(interval));
        self.settings.health_timeout = Some(Parsed(timeout));
        self
    }

    /// `--max-memory`: replace a worker gracefully once its resident memory passes
    /// `bytes`.
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.settings.max_memory = Some(Parsed(crate::config::ByteSize(bytes)));
        self
    }

    /// `--log-format` and `-v`/`-q` (verbosity -2..=2).
    pub fn logging(mut self, format: LogFormat, verbosity: i8) -> Self {
        self.log_format = Some(format);
        self.verbosity = verbosity;
        self
    }

    /// Called in the primary for each message a worker sends with
    /// [`Worker::send`]: `(control, from_slot, data)`. Use `control` to answer one worker
    /// or broadcast (Node's `cluster.on('message')`).
    pub fn on_message(mut self, hook: impl FnMut(&mut Control, usize, Value) + 'static) -> Self {
        self.hooks.on_message = Some(Box::new(hook));
        self
    }

    /// Runs the cluster and returns the process exit status.
    ///
    /// In the primary (the process the user started) this spawns the workers, supervises
    /// them until SIGTERM/SIGINT and returns. In each worker (the same executable, started
    /// again by the primary with the same arguments) it binds and registers the worker's
    /// socket, calls `serve` with the [`Worker`], and returns when `serve` does. Call it
    /// early in `main`. The primary catches SIGTERM, SIGINT, SIGHUP, SIGUSR2 and SIGCHLD
    /// with process-wide handlers, so other threads are fine; it becomes a subreaper and
    /// reaps any child that exits, except those the process had before `run`.
    pub fn run<F>(self, serve: F) -> ExitCode
    where
        F: FnOnce(Worker) -> std::io::Result<()>,
    {
        if std::env::var(env::ROLE).as_deref() == Ok(env::ROLE_LIBRARY) {
            return crate::worker::run_library(serve);
        }
        let file = match &self.config_file {
            Some(path) => Settings::from_file(path),
            None => Ok(Settings::default()),
        };
        let overrides = self.settings.clone();
        let config = file
            .and_then(|file| self.settings.overlay(file).into_config())
            .map(|mut config| {
                config.overrides = overrides;
                config.verbosity = self.verbosity;
                if let Some(format) = self.log_format {
                    config.log_format = format;
                }
                config.config_file = self.config_file.clone();
                config.command = None;
                config
            });
        let config = match config {
            Ok(config) => config,
            Err(err) => {
                eprintln!("steer: {}", crate::errors::error_chain(&err));
                return ExitCode::from(crate::exit::EXIT_USAGE);
            }
        };
        crate::logging::init(config.log_format, config.verbosity);
        crate::primary::run(config, WorkerProgram::Library, self.hooks)
    }
}
