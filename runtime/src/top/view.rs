//! What `steer top` shows, kept apart from the terminal so one frame can be rendered from
//! a recorded `/status` document in a test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};

use crate::status::client::{human_bytes, human_duration};
use crate::status::{StatusDocument, WorkerStatus};

/// The live view's state: the latest document, the rates derived from the one before, and
/// the last error.
#[derive(Debug)]
pub struct View {
    addr: SocketAddr,
    interval: Duration,
    latest: Option<(StatusDocument, Instant)>,
    /// New connections per second by slot, from the last two documents.
    rates: HashMap<usize, f64>,
    error: Option<String>,
}

impl View {
    /// An empty view of the cluster whose status listener is `addr`.
    pub fn new(addr: SocketAddr, interval: Duration) -> View {
        View {
            addr,
            interval,
            latest: None,
            rates: HashMap::new(),
            error: None,
        }
    }

    /// Takes a fresh document read at `at`; the rates are the growth of each slot's
    /// `accepted` since the previous document. A slot whose count went down (another
    /// primary now answers on the address) has no rate until the next refresh.
    pub fn update(&mut self, doc: StatusDocument, at: Instant) {
        self.rates.clear();
        if let Some((previous, then)) = &self.latest
            && previous.primary.pid == doc.primary.pid
        {
            let seconds = at.saturating_duration_since(*then).as_secs_f64();
            if seconds > 0.0 {
                for worker in &doc.workers {
                    let before = previous.workers.iter().find(|w| w.slot == worker.slot);
                    if let Some(grown) =
                        before.and_then(|b| worker.accepted?.checked_sub(b.accepted?))
                    {
                        self.rates.insert(worker.slot, grown as f64 / seconds);
                    }
                }
            }
        }
        self.latest = Some((doc, at));
        self.error = None;
    }

    /// Records a failed refresh; the last document stays on screen, marked as old.
    pub fn failed(&mut self, error: String) {
        self.error = Some(error);
    }

    /// Draws the whole screen; `now` dates the data shown.
    pub fn render(&self, frame: &mut Frame, now: Instant) {
        let [header, table, footer] = Layout::vertical([
            Constraint::Length(4),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(Paragraph::new(self.header_lines()), header);
        frame.render_widget(self.table(), table);
        frame.render_widget(Paragraph::new(self.footer_line(now)), footer);
    }

    fn header_lines(&self) -> Vec<Line<'static>> {
        let Some((doc, _)) = &self.latest else {
            return vec![Line::from(format!(
                "steer top: waiting for {}/status",
                self.addr
            ))];
        };
        let p = &doc.primary;
        let t = &doc.totals;
        // No rate yet (the first document, or the first after an upgrade) is "-", as in
        // the rows: an empty float sum is -0.0, which printed "-0.0 conn/s".
        let total_rate = if self.rates.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.1}", self.rates.values().fold(0.0, |sum, r| sum + r))
        };
        let bold = Style::default().add_modifier(Modifier::BOLD);
        let mut lines = vec![
            Line::from(vec![
                Span::styled("steer ", bold),
                Span::raw(format!(
                    "primary {}  {}  up {}  listen {}  ",
                    p.pid,
                    p.phase,
                    human_duration(p.uptime_s),
                    p.listen
                )),
                Span::styled(format!("policy {}", p.balance), bold),
            ]),
            Line::from(format!(
                "{} workers, {} ready, {} restarts, {} connections accepted, {} conn/s",
                t.workers, t.ready, t.restarts, t.accepted, total_rate
            )),
        ];
        if doc.listeners.len() > 1 || doc.listeners.iter().any(|l| l.protocol != "tcp") {
            for l in &doc.listeners {
                lines.push(Line::from(match l.steered {
                    Some(steered) => format!(
                        "listener {} {}://{}: {steered} steered, {} dropped, {} refused",
                        l.name, l.protocol, l.address, l.drops, l.refusals
                    ),
                    None => format!("listener {} {}://{}", l.name, l.protocol, l.address),
                }));
            }
        }
        if let Some(s) = &doc.steering {
            lines.push(Line::from(format!(
                "eBPF {}: {} migrated, {} fallbacks, {} dropped",
                s.policy, s.migrations, s.fallbacks, s.drops
            )));
        }
        lines
    }

    fn table(&self) -> Table<'static> {
        let header = Row::new([
            "SLOT",
            "PID",
            "GEN",
            "STATE",
            "CONN/S",
            "ACCEPTED",
            "ACTIVE",
            "RSS",
            "RESTARTS",
            "HEARTBEAT",
            "LAST EXIT",
        ])
        .style(Style::default().add_modifier(Modifier::REVERSED));
        let rows: Vec<Row> = self
            .latest
            .iter()
            .flat_map(|(doc, _)| doc.workers.iter())
            .map(|w| self.row(w))
            .collect();
        Table::new(
            rows,
            [
                Constraint::Length(4),
                Constraint::Length(8),
                Constraint::Length(4),
                Constraint::Length(14),
                Constraint::Length(8),
                Constraint::Length(10),
                Constraint::Length(7),
                Constraint::Length(10),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Min(10),
            ],
        )
        .header(header)
        .block(Block::default().borders(Borders::TOP).title(" workers "))
    }

    fn row(&self, w: &WorkerStatus) -> Row<'static> {
        let dash = || "-".to_owned();
        let mut state = w.state.clone();
        if let Some(ms) = w.next_restart_in_ms {
            state = format!("{state} {ms}ms");
        }
        if w.stalled {
            state.push_str(" stalled");
        }
        let color = match w.state.as_str() {
            "ready" if w.stalled => Color::Yellow,
            "ready" => Color::Green,
            "starting" | "draining" | "backoff" => Color::Yellow,
            _ => Color::Red,
        };
        Row::new([
            Cell::from(w.slot.to_string()),
            Cell::from(w.pid.map_or_else(dash, |p| p.to_string())),
            Cell::from(w.generation.to_string()),
            Cell::from(state).style(Style::default().fg(color)),
            Cell::from(
                self.rates
                    .get(&w.slot)
                    .map_or_else(dash, |r| format!("{r:.1}")),
            ),
            Cell::from(w.accepted.map_or_else(dash, |n| n.to_string())),
            Cell::from(w.active.map_or_else(dash, |n| n.to_string())),
            Cell::from(w.rss_bytes.map_or_else(dash, human_bytes)),
            Cell::from(w.restarts.to_string()),
            Cell::from(w.health_ms.map_or_else(dash, |ms| format!("{ms}ms"))),
            Cell::from(w.last_exit.clone().unwrap_or_else(dash)),
        ])
    }

    fn footer_line(&self, now: Instant) -> Line<'static> {
        let keys = format!(
            "q quit · refresh {} · {}",
            humantime::format_duration(self.interval),
            self.addr
        );
        match (&self.error, &self.latest) {
            (Some(error), Some((_, at))) => Line::from(vec![
                Span::styled(
                    format!(
                        "{error} (data from {}s ago)  ",
                        now.saturating_duration_since(*at).as_secs()
                    ),
                    Style::default().fg(Color::Red),
                ),
                Span::raw(keys),
            ]),
            (Some(error), None) => Line::from(vec![
                Span::styled(format!("{error}  "), Style::default().fg(Color::Red)),
                Span::raw(keys),
            ]),
            (None, _) => Line::from(keys),
        }
    }
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;

    /// Two `/status` documents recorded one second apart from a 4-worker round-robin
    /// cluster under load (then slot 3 was killed, so it shows a restart and its last exit).
    const BEFORE: &str = include_str!("fixtures/status-before.json");
    const AFTER: &str = include_str!("fixtures/status-after.json");

    fn screen(view: &View, now: Instant) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(120, 16)).expect("test terminal");
        terminal
            .draw(|frame| view.render(frame, now))
            .expect("draw");
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    fn doc(text: &str) -> StatusDocument {
        serde_json::from_str(text).expect("fixture is a /status document")
    }

    fn row(lines: &[String], slot: usize) -> &str {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(&slot.to_string()))
            .unwrap_or_else(|| panic!("no row for slot {slot}:\n{}", lines.join("\n")))
    }

    #[test]
    fn one_frame_shows_policy_workers_and_connection_rates() {
        let (before, after) = (doc(BEFORE), doc(AFTER));
        let t0 = Instant::now();
        let mut view = View::new(
            "127.0.0.1:8001".parse().expect("addr"),
            Duration::from_secs(1),
        );
        view.update(before.clone(), t0);
        view.update(after.clone(), t0 + Duration::from_secs(2));
        let lines = screen(&view, t0 + Duration::from_secs(2));
        let text = lines.join("\n");

        assert!(
            text.contains(&format!("primary {}", after.primary.pid)),
            "{text}"
        );
        assert!(
            text.contains(&format!("policy {}", after.primary.balance)),
            "{text}"
        );
        assert!(text.contains("q quit"), "{text}");
        for w in &after.workers {
            let line = row(&lines, w.slot);
            let cells: Vec<&str> = line.split_whitespace().collect();
            let pid = w.pid.map_or("-".to_owned(), |p| p.to_string());
            assert_eq!(cells[1], pid, "pid of slot {}: {line}", w.slot);
            assert_eq!(cells[3], w.state, "state of slot {}: {line}", w.slot);
            let b = before
                .workers
                .iter()
                .find(|b| b.slot == w.slot)
                .expect("slot");
            let (now, then) = (w.accepted.expect("counted"), b.accepted.expect("counted"));
            let rate = (now - then) as f64 / 2.0;
            assert_eq!(
                cells[4],
                format!("{rate:.1}"),
                "conn/s of slot {}: {line}",
                w.slot
            );
            assert_eq!(cells[5], now.to_string(), "{line}");
            // RSS takes two cells ("3.1 MiB").
            assert_eq!(cells[9], w.restarts.to_string(), "restarts: {line}");
            let rss = w.rss_bytes.map(human_bytes).expect("fixture has RSS");
            assert!(line.contains(&rss), "RSS {rss} of slot {}: {line}", w.slot);
        }
        let restarted = after
            .workers
            .iter()
            .find(|w| w.restarts > 0)
            .expect("a restart");
        let exit = restarted.last_exit.as_deref().expect("its last exit");
        assert!(row(&lines, restarted.slot).contains(exit), "{text}");
    }

    #[test]
    fn the_first_frame_has_no_rate_and_a_failed_refresh_keeps_the_data() {
        let after = doc(AFTER);
        let t0 = Instant::now();
        let mut view = View::new(
            "127.0.0.1:8001".parse().expect("addr"),
            Duration::from_secs(1),
        );
        let waiting = screen(&view, t0).join("\n");
        assert!(
            waiting.contains("waiting for 127.0.0.1:8001/status"),
            "{waiting}"
        );

        view.update(after.clone(), t0);
        view.failed("cannot read 127.0.0.1:8001/status: connection refused".into());
        let lines = screen(&view, t0 + Duration::from_secs(5));
        let text = lines.join("\n");
        assert!(
            text.contains("connection refused (data from 5s ago)"),
            "{text}"
        );
        let cells: Vec<&str> = row(&lines, 0).split_whitespace().collect();
        assert_eq!(cells[4], "-", "no rate from a single document: {text}");
        assert!(text.contains("accepted, - conn/s"), "{text}");
    }

    #[test]
    fn after_an_upgrade_the_total_rate_is_unknown_never_negative_zero() {
        let (before, mut after) = (doc(BEFORE), doc(AFTER));
        after.primary.pid += 1;
        let t0 = Instant::now();
        let mut view = View::new(
            "127.0.0.1:8001".parse().expect("addr"),
            Duration::from_secs(1),
        );
        view.update(before, t0);
        view.update(after, t0 + Duration::from_secs(1));
        let text = screen(&view, t0 + Duration::from_secs(1)).join("\n");
        assert!(!text.contains("-0.0"), "{text}");
        assert!(text.contains("accepted, - conn/s"), "{text}");
    }
}
