//! How long the demo waits for a client, at each point where a client can make it wait
//! (nginx's `client_header_timeout`, `keepalive_timeout`, `client_body_timeout` and
//! `send_timeout`). Set with `--demo-header-timeout` and the like; the primary hands them
//! to each demo worker in `STEER_DEMO_TIMEOUTS`.

use std::time::Duration;

use crate::config::Config;

/// The environment variable that carries [`Timeouts`] to a demo worker.
pub(crate) const ENV: &str = "STEER_DEMO_TIMEOUTS";

/// Limits on how long a connection may keep the demo waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A request head must be complete this long after its first byte (or, on a fresh
    /// connection, after the accept).
    pub header: Duration,
    /// A keep-alive connection may sit between requests this long.
    pub idle: Duration,
    /// A request body may pause this long between two reads.
    pub body: Duration,
    /// A response may wait this long for the client to read any of it.
    pub send: Duration,
    /// `--shutdown-timeout`: a draining worker's QUIC connections get a GOAWAY before it
    /// runs out. Not a client timeout: the sweep ignores it.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let d = Config::default();
        Timeouts::from_config(&d)
    }
}

impl Timeouts {
    /// The demo's timeouts in `config`.
    pub fn from_config(config: &Config) -> Timeouts {
        Timeouts {
            header: config.demo_header_timeout,
            idle: config.demo_idle_timeout,
            body: config.demo_body_timeout,
            send: config.demo_send_timeout,
            shutdown: config.shutdown_timeout,
        }
    }

    /// How often connections are checked against their deadlines: an eighth of the
    /// shortest timeout, from 10 ms to 250 ms, so a timeout is kept to within an eighth.
    pub fn sweep_interval(&self) -> Duration {
        let shortest = self.header.min(self.idle).min(self.body).min(self.send);
        (shortest / 8).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }

    /// The value of [`ENV`]: `header=10000,idle=30000,body=30000,send=30000,shutdown=30000`
    /// (milliseconds).
    pub(crate) fn to_env(self) -> String {
        let ms = |d: Duration| d.as_millis();
        format!(
            "header={},idle={},body={},send={},shutdown={}",
            ms(self.header),
            ms(self.idle),
            ms(self.body),
            ms(self.send),
            ms(self.shutdown)
        )
    }

    /// The timeouts the primary handed this worker process, or the defaults (with a
    /// warning) if the variable does not read.
    pub fn from_process_env() -> Timeouts {
        let text = std::env::var(ENV).unwrap_or_default();
        Timeouts::from_env(&text).unwrap_or_else(|err| {
            tracing::warn!("{err}; using the default timeouts");
            Timeouts::default()
        })
    }

    /// Reads [`Timeouts::to_env`]'s form; names left out keep their default. The error names
    /// the part that does not read.
    pub(crate) fn from_env(text: &str) -> Result<Timeouts, String> {
        let mut timeouts = Timeouts::default();
        for part in text.split(',').filter(|part| !part.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{ENV}: {part:?} is not name=milliseconds"))?;
            let ms: u64 = value
                .parse()
                .ok()
                .filter(|&ms| ms > 0)
                .ok_or_else(|| format!("{ENV}: {part:?} is not a positive number of ms"))?;
            let slot = match name {
                "header" => &mut timeouts.header,
                "idle" => &mut timeouts.idle,
                "body" => &mut timeouts.body,
                "send" => &mut timeouts.send,
                "shutdown" => &mut timeouts.shutdown,
                _ => return Err(format!("{ENV}: unknown timeout {name:?}")),
            };
            *slot = Duration::from_millis(ms);
        }
        Ok(timeouts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_form_round_trips_and_names_what_is_wrong() {
        let timeouts = Timeouts {
            header: Duration::from_millis(1500),
            idle: Duration::from_secs(2),
            body: Duration::from_secs(3),
            send: Duration::from_secs(4),
            shutdown: Duration::from_secs(5),
        };
        assert_eq!(Timeouts::from_env(&timeouts.to_env()), Ok(timeouts));
        assert_eq!(Timeouts::from_env(""), Ok(Timeouts::default()));
        for bad in ["header", "header=0", "header=soon", "nap=5"] {
            let err = Timeouts::from_env(bad).expect_err(bad);
            assert!(err.contains(ENV), "{err}");
        }
        assert_eq!(
            timeouts.sweep_interval(),
            Duration::from_millis(187) + Duration::from_micros(500)
        );
        assert_eq!(
            Timeouts::default().sweep_interval(),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn defaults_are_at_most_a_minute() {
        let d = Timeouts::default();
        for timeout in [d.header, d.idle, d.body, d.send] {
            assert!(timeout > Duration::ZERO && timeout <= Duration::from_secs(60));
        }
    }
}
