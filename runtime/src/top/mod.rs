//! `steer top`: a live view of a running cluster (like `pm2 monit`).
//!
//! Every `--interval` it reads `GET /status` (each read bounded in time and size, see
//! [`crate::status::client`]), works out each slot's new connections per
//! second from the growth of its `accepted` counter, and redraws: the primary, the policy,
//! and one row per worker (state, pid, connections/s, RSS, restarts, heartbeat age). `q`,
//! `Esc` or `Ctrl-C` quits. What is drawn is [`view::View`], a plain value the tests render
//! into ratatui's `TestBackend`.

pub mod view;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ratatui::DefaultTerminal;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::status::StatusDocument;
use crate::status::client::{explain, fetch};
pub use view::View;

/// Runs the live view until the user quits. Exit 1 if the first read of `/status` fails
/// (nothing to watch there: the message says why), without a terminal, or if the terminal
/// fails. Later failed reads are shown in the view, which keeps trying.
pub fn run(addr: SocketAddr, interval: Duration) -> ExitCode {
    let first = match fetch(addr, "/status") {
        Ok(body) => body,
        Err(err) => {
            eprintln!("{}", explain(addr, &err));
            return ExitCode::from(crate::exit::EXIT_FAILURE);
        }
    };
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        eprintln!(
            "steer: `steer top` draws on a terminal and stdout is not one; use `steer status` \
             (or `steer status --json`) in scripts"
        );
        return ExitCode::from(crate::exit::EXIT_FAILURE);
    }
    let mut terminal = match ratatui::try_init() {
        Ok(terminal) => terminal,
        Err(err) => {
            eprintln!("steer: cannot set up the terminal: {err}");
            return ExitCode::from(crate::exit::EXIT_FAILURE);
        }
    };
    let result = watch(&mut terminal, addr, interval, parse(addr, &first));
    ratatui::restore();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("steer: the terminal failed: {err}");
            ExitCode::from(crate::exit::EXIT_FAILURE)
        }
    }
}

/// Fetch, draw, wait for a key or the next refresh; until a quit key.
fn watch(
    terminal: &mut DefaultTerminal,
    addr: SocketAddr,
    interval: Duration,
    first: Result<StatusDocument, String>,
) -> std::io::Result<()> {
    let mut view = View::new(addr, interval);
    let mut read = Some(first);
    let mut next_fetch = Instant::now();
    loop {
        if Instant::now() >= next_fetch {
            match read.take().unwrap_or_else(|| read_status(addr)) {
                Ok(doc) => view.update(doc, Instant::now()),
                Err(err) => view.failed(err),
            }
            next_fetch = Instant::now() + interval;
        }
        terminal.draw(|frame| view.render(frame, Instant::now()))?;
        let wait = next_fetch.saturating_duration_since(Instant::now());
        if event::poll(wait)?
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
            && is_quit(key.code, key.modifiers)
        {
            return Ok(());
        }
    }
}

fn is_quit(code: KeyCode, modifiers: KeyModifiers) -> bool {
    match code {
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
        KeyCode::Char('c') => modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

fn read_status(addr: SocketAddr) -> Result<StatusDocument, String> {
    let body = fetch(addr, "/status").map_err(|e| {
        format!(
            "cannot read {addr}/status: {}",
            crate::errors::error_chain(&e)
        )
    })?;
    parse(addr, &body)
}

fn parse(addr: SocketAddr, body: &str) -> Result<StatusDocument, String> {
    serde_json::from_str(body).map_err(|e| format!("{addr}/status is not understood: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_escape_and_ctrl_c_quit() {
        assert!(is_quit(KeyCode::Char('q'), KeyModifiers::NONE));
        assert!(is_quit(KeyCode::Esc, KeyModifiers::NONE));
        assert!(is_quit(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(!is_quit(KeyCode::Char('c'), KeyModifiers::NONE));
        assert!(!is_quit(KeyCode::Char('x'), KeyModifiers::NONE));
    }
}
