//! `/metrics` in the Prometheus text exposition format (version 0.0.4), rendered from the
//! status document, so `/status` and `/metrics` never disagree.
//!
//! Every family has `# HELP` and `# TYPE`; per-slot series carry the label `slot`, and
//! the slot's state is a `state` label on a 0/1 gauge (one series per possible state, so a
//! query such as `steer_worker_state{state="failed"} == 1` works without gaps). Counters
//! end in `_total`. The steering families appear only when an eBPF policy runs; the
//! program counts fallbacks, drops and migrations for the whole group, not per slot.

use std::fmt::Write;

use super::{ListenerStatus, StatusDocument, WorkerStatus};

/// Every value of the `state` label, as `/status` spells the states.
pub const STATES: &[&str] = &[
    "starting", "ready", "hung", "draining", "backoff", "failed", "stopped",
];

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "{}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }
}

struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &'static str, kind: &str, help: &str) -> Family<'_> {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// A gauge or counter with one series per slot; slots without a value are left out.
    fn per_slot(
        &mut self,
        doc: &StatusDocument,
        name: &'static str,
        kind: &str,
        help: &str,
        value: impl Fn(&WorkerStatus) -> Option<f64>,
    ) {
        let mut family = self.family(name, kind, help);
        for w in &doc.workers {
            if let Some(v) = value(w) {
                family.sample(&[("slot", &w.slot.to_string())], v);
            }
        }
    }
}

/// Renders `doc` as Prometheus text.
pub fn render(doc: &StatusDocument) -> String {
    let mut e = Exposition {
        out: String::with_capacity(4096),
    };
    let p = &doc.primary;
    e.family(
        "steer_info",
        "gauge",
        "Always 1; the labels say what runs: the version, the policy in force and the address.",
    )
    .sample(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("balance", &p.balance),
            ("listen", &p.listen),
        ],
        1.0,
    );
    e.family("steer_up", "gauge", "1 while the primary runs.")
        .sample(&[], 1.0);
    e.family(
        "steer_primary_uptime_seconds",
        "gauge",
        "Seconds since the primary started.",
    )
    .sample(&[], p.uptime_s as f64);
    if let Some(rss) = p.rss_bytes {
        e.family(
            "steer_primary_rss_bytes",
            "gauge",
            "Resident memory of the primary.",
        )
        .sample(&[], rss as f64);
    }
    let mut phase = e.family(
        "steer_primary_phase",
        "gauge",
        "1 for the primary's phase: running, rolling (a rolling restart), upgrading (a new primary is starting) or stopping.",
    );
    for name in ["running", "rolling", "upgrading", "stopping"] {
        phase.sample(&[("phase", name)], f64::from(u8::from(p.phase == name)));
    }
    e.family(
        "steer_log_lines_dropped_total",
        "counter",
        "Log lines the primary dropped because stderr could not keep up.",
    )
    .sample(&[], p.log_lines_dropped as f64);
    e.family(
        "steer_primary_stalls_total",
        "counter",
        "Times the primary's loop ran late and restarted heartbeat deadlines instead of blaming workers.",
    )
    .sample(&[], p.stalls as f64);
    e.family(
        "steer_foreign_listeners",
        "gauge",
        "Listening sockets on the cluster's port (either address family) that are not the cluster's.",
    )
    .sample(&[], p.foreign_listeners as f64);
    e.family("steer_workers", "gauge", "Configured worker slots.")
        .sample(&[], doc.totals.workers as f64);
    e.family("steer_workers_ready", "gauge", "Slots in state ready.")
        .sample(&[], doc.totals.ready as f64);

    let mut state = e.family(
        "steer_worker_state",
        "gauge",
        "1 for the slot's state (starting, ready, hung, draining, backoff, failed, stopped), 0 for the others.",
    );
    for w in &doc.workers {
        let slot = w.slot.to_string();
        for name in STATES {
            state.sample(
                &[("slot", &slot), ("state", name)],
                f64::from(u8::from(w.state == *name)),
            );
        }
    }
    e.per_slot(
        doc,
        "steer_worker_accepted_total",
        "counter",
        "Connections accepted per slot, over every generation (steered there, under eBPF; absent under kernel for programs that do not report counters).",
        |w| w.accepted.map(|n| n as f64),
    );
    e.per_slot(
        doc,
        "steer_worker_restarts_total",
        "counter",
        "Crash restarts per slot (protocol violations included).",
        |w| Some(f64::from(w.restarts)),
    );
    e.per_slot(
        doc,
        "steer_worker_messages_dropped_total",
        "counter",
        "User messages from the slot not relayed: over its relay budget, or the receiver was full.",
        |w| Some(w.messages_dropped as f64),
    );
    e.per_slot(
        doc,
        "steer_worker_output_dropped_lines_total",
        "counter",
        "Lines the slot's workers wrote to stdout or stderr that the primary dropped because its output could not keep up.",
        |w| Some(w.output_dropped as f64),
    );
    e.per_slot(
        doc,
        "steer_worker_generation",
        "gauge",
        "Generation of the slot's process; grows with each replacement.",
        |w| Some(w.generation as f64),
    );
    e.per_slot(
        doc,
        "steer_worker_uptime_seconds",
        "gauge",
        "Seconds since the slot's process started.",
        |w| w.uptime_s.map(|s| s as f64),
    );
    e.per_slot(
        doc,
        "steer_worker_rss_bytes",
        "gauge",
        "Resident memory of the slot's process.",
        |w| w.rss_bytes.map(|b| b as f64),
    );
    e.per_slot(
        doc,
        "steer_worker_heartbeat_age_seconds",
        "gauge",
        "Seconds the slot's process has owed an answer to a ping (0 when it owes none; absent for programs that do not speak the protocol). A watched worker is hung past health-timeout.",
        |w| w.health_ms.map(|ms| ms as f64 / 1000.0),
    );
    e.per_slot(
        doc,
        "steer_worker_active_connections",
        "gauge",
        "Open connections per slot at the last heartbeat (absent for programs that do not report counters).",
        |w| w.active.map(|n| n as f64),
    );
    e.per_slot(
        doc,
        "steer_worker_requests_total",
        "counter",
        "Requests answered by the slot's current process (restarts from 0 with a new process; absent for programs that do not report counters).",
        |w| w.requests.map(|n| n as f64),
    );
    if doc.steering.is_some() {
        e.per_slot(
            doc,
            "steer_worker_stalled",
            "gauge",
            "1 while the slot's worker is stalled (connections queued, none accepted for 2 ms) and the eBPF policy steers new connections around it; it stays ready and is not replaced.",
            |w| Some(if w.stalled { 1.0 } else { 0.0 }),
        );
        e.per_slot(
            doc,
            "steer_worker_stalls_total",
            "counter",
            "Times the slot's worker became stalled.",
            |w| Some(w.stalls as f64),
        );
    }
    if let Some(steering) = &doc.steering {
        let mut selections = e.family(
            "steer_steering_selections_total",
            "counter",
            "Connections the eBPF program handed to each slot, new and migrated.",
        );
        for (slot, n) in steering.selections.iter().enumerate() {
            selections.sample(&[("slot", &slot.to_string())], *n as f64);
        }
        for (name, help, value) in [
            (
                "steer_steering_fallbacks_total",
                "Connections whose chosen slot held no socket and went to another live slot.",
                steering.fallbacks,
            ),
            (
                "steer_steering_drops_total",
                "Connections dropped because no live slot could take them.",
                steering.drops,
            ),
            (
                "steer_steering_migrations_total",
                "Connections migrated out of a closing listener to a live slot.",
                steering.migrations,
            ),
            (
                "steer_steering_takeovers_total",
                "Times another program (or none) was found deciding for the port's group and Steer's was attached again.",
                steering.takeovers,
            ),
            (
                "steer_steering_turns_lost_total",
                "Round-robin turns lost or gained for good around stalled workers: connections of drift from the exact split.",
                steering.turns_lost,
            ),
        ] {
            e.family(name, "counter", help).sample(&[], value as f64);
        }
    }
    for (name, help, value) in [
        (
            "steer_listener_steered_total",
            "Connections (TCP) or datagrams (UDP) the eBPF program handed to a worker, per listener.",
            (|l: &ListenerStatus| l.steered) as fn(&ListenerStatus) -> Option<u64>,
        ),
        (
            "steer_listener_drops_total",
            "Connections or datagrams dropped because no live slot could take them, per listener.",
            |l: &ListenerStatus| l.steered.map(|_| l.drops),
        ),
        (
            "steer_listener_refusals_total",
            "SYNs and new UDP flows the per-client limit refused, per listener.",
            |l: &ListenerStatus| l.steered.map(|_| l.refusals),
        ),
        (
            "steer_listener_flow_inserts_total",
            "UDP flows entered into the listener's flow table (new, idle past the timeout, or moved).",
            |l: &ListenerStatus| l.flows.map(|f| f.inserts),
        ),
        (
            "steer_listener_flow_moves_total",
            "Datagrams of a known UDP flow whose socket had left (its process exited or drained), steered again.",
            |l: &ListenerStatus| l.flows.map(|f| f.moves),
        ),
    ] {
        let mut family = e.family(name, "counter", help);
        for listener in &doc.listeners {
            if let Some(n) = value(listener) {
                family.sample(
                    &[
                        ("listener", &listener.name),
                        ("protocol", &listener.protocol),
                        ("address", &listener.address),
                    ],
                    n as f64,
                );
            }
        }
    }
    if let Some(limits) = &doc.client_limits {
        let mut refused = e.family(
            "steer_client_refusals_total",
            "counter",
            "New connections (SYNs) refused by the per-client limit, per listening address.",
        );
        for listener in &limits.refused {
            refused.sample(&[("listener", &listener.listener)], listener.refused as f64);
        }
        for (name, kind, help, value) in [
            (
                "steer_client_table_entries",
                "gauge",
                "Client prefixes in the per-client limit's table (as of the last health interval).",
                limits.clients_tracked,
            ),
            (
                "steer_client_table_size",
                "gauge",
                "The per-client limit table's bound (client-table-size).",
                limits.table_size,
            ),
            (
                "steer_client_inserts_total",
                "counter",
                "Client prefixes entered into the per-client limit's table.",
                limits.inserts,
            ),
            (
                "steer_client_evictions_total",
                "counter",
                "Client prefixes evicted from the per-client limit's table (inserts minus entries).",
                limits.evictions,
            ),
        ] {
            e.family(name, kind, help).sample(&[], value as f64);
        }
        let mut top = e.family(
            "steer_client_prefix_refusals_total",
            "counter",
            "SYNs refused per client prefix, for the ten most-refused prefixes.",
        );
        for prefix in &limits.top_refused {
            top.sample(&[("prefix", &prefix.prefix)], prefix.refused as f64);
        }
    }
    e.out
}

/// Label values escape `\`, `"` and newlines.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Integers without a fraction; others as Rust prints them (a valid Go float).
fn format_value(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{
        ClientLimitsStatus, ListenerRefusals, PrimaryStatus, RefusedPrefix, SteeringStatus, Totals,
    };

    fn doc() -> StatusDocument {
        let worker = |slot: usize, state: &str| WorkerStatus {
            slot,
            pid: Some(100 + slot as i32),
            generation: 1,
            state: state.into(),
            uptime_s: Some(5),
            restarts: slot as u32,
            accepted: Some(10 * slot as u64),
            active: Some(1),
            requests: Some(7),
            rss_bytes: Some(4096),
            last_exit: None,
            next_restart_in_ms: None,
            health_ms: Some(250),
            draining: 0,
            messages_dropped: 0,
            output_dropped: 0,
            stalled: slot == 1,
            stalls: slot as u64,
        };
        StatusDocument {
            listeners: vec![ListenerStatus {
                name: "web".into(),
                protocol: "tcp".into(),
                address: "127.0.0.1:8000".into(),
                steered: Some(12),
                drops: 1,
                refusals: 0,
                takeovers: 0,
                flows: None,
                quic: None,
            }],
            primary: PrimaryStatus {
                pid: 1,
                uptime_s: 9,
                balance: "round-robin".into(),
                listen: "127.0.0.1:8000".into(),
                phase: "running".into(),
                rss_bytes: Some(8192),
                log_lines_dropped: 0,
                stalls: 0,
                roll_abandoned: None,
                foreign_listeners: 0,
                foreign_listener_addresses: Vec::new(),
            },
            workers: vec![worker(0, "ready"), worker(1, "backoff")],
            totals: Totals {
                workers: 2,
                ready: 1,
                restarts: 1,
                accepted: 10,
            },
            steering: Some(SteeringStatus {
                policy: "round-robin".into(),
                selections: vec![0, 10],
                fallbacks: 1,
                drops: 2,
                migrations: 3,
                takeovers: 4,
                turns_lost: 5,
            }),
            client_limits: Some(ClientLimitsStatus {
                rate: "50/s".into(),
                burst: 10,
                refused: vec![ListenerRefusals {
                    listener: "127.0.0.1:8000".into(),
                    refused: 7,
                }],
                clients_tracked: 3,
                table_size: 1024,
                inserts: 5,
                evictions: 2,
                top_refused: vec![RefusedPrefix {
                    prefix: "127.0.0.9/32".into(),
                    refused: 7,
                }],
            }),
        }
    }

    #[test]
    fn state_is_a_labelled_gauge_with_every_state() {
        let text = render(&doc());
        assert!(
            text.contains("steer_worker_state{slot=\"0\",state=\"ready\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("steer_worker_state{slot=\"0\",state=\"failed\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("steer_worker_state{slot=\"1\",state=\"backoff\"} 1\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("steer_worker_state{").count(),
            2 * STATES.len()
        );
        assert!(text.contains("steer_worker_heartbeat_age_seconds{slot=\"1\"} 0.25\n"));
        assert!(text.contains("steer_steering_selections_total{slot=\"1\"} 10\n"));
        assert!(text.contains("steer_steering_drops_total 2\n"));
        assert!(text.contains("steer_steering_takeovers_total 4\n"));
        assert!(text.contains("steer_steering_turns_lost_total 5\n"));
        assert!(text.contains("steer_primary_phase{phase=\"running\"} 1\n"));
        assert!(text.contains("steer_client_refusals_total{listener=\"127.0.0.1:8000\"} 7\n"));
        assert!(text.contains("steer_client_evictions_total 2\n"));
        assert!(text.contains("steer_client_prefix_refusals_total{prefix=\"127.0.0.9/32\"} 7\n"));
    }

    #[test]
    fn counters_a_worker_never_reported_are_left_out_not_zero() {
        let mut doc = doc();
        doc.steering = None;
        let silent = &mut doc.workers[1];
        (silent.accepted, silent.active, silent.requests) = (None, None, None);
        let text = render(&doc);
        for family in [
            "steer_worker_accepted_total",
            "steer_worker_active_connections",
            "steer_worker_requests_total",
        ] {
            assert!(text.contains(&format!("{family}{{slot=\"0\"}}")), "{text}");
            assert!(!text.contains(&format!("{family}{{slot=\"1\"}}")), "{text}");
        }
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let text = render(&doc());
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap_or_default().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                assert_eq!(declared.last().map(String::as_str), Some(name), "{line}");
            }
        }
        assert_eq!(
            text.matches("# HELP ").count(),
            text.matches("# TYPE ").count()
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.25), "0.25");
    }
}
