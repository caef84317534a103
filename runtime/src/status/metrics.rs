//! `/metrics` in the Prometheus text exposition format, rendered from the status document.

use std::fmt::Write;

use super::StatusDocument;

/// Renders `doc` as Prometheus text (format version 0.0.4).
pub fn render(doc: &StatusDocument) -> String {
    let mut out = String::with_capacity(2048);
    let mut family =
        |name: &str, kind: &str, help: &str, samples: &mut dyn Iterator<Item = (String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
    let slot = |s: usize| format!("{{slot=\"{s}\"}}");
    family(
        "steer_up",
        "gauge",
        "1 while the primary runs.",
        &mut std::iter::once((String::new(), 1.0)),
    );
    family(
        "steer_primary_uptime_seconds",
        "gauge",
        "Seconds since the primary started.",
        &mut std::iter::once((String::new(), doc.primary.uptime_s as f64)),
    );
    family(
        "steer_worker_accepted_total",
        "counter",
        "Connections accepted per slot, over every generation.",
        &mut doc
            .workers
            .iter()
            .map(|w| (slot(w.slot), w.accepted as f64)),
    );
    family(
        "steer_worker_restarts_total",
        "counter",
        "Crash restarts per slot.",
        &mut doc
            .workers
            .iter()
            .map(|w| (slot(w.slot), f64::from(w.restarts))),
    );
    family(
        "steer_worker_ready",
        "gauge",
        "1 if the slot is ready.",
        &mut doc
            .workers
            .iter()
            .map(|w| (slot(w.slot), if w.state == "ready" { 1.0 } else { 0.0 })),
    );
    family(
        "steer_worker_active_connections",
        "gauge",
        "Open connections per slot at the last heartbeat.",
        &mut doc.workers.iter().map(|w| (slot(w.slot), w.active as f64)),
    );
    family(
        "steer_worker_rss_bytes",
        "gauge",
        "Resident memory of the slot's process.",
        &mut doc
            .workers
            .iter()
            .filter_map(|w| Some((slot(w.slot), w.rss_bytes? as f64))),
    );
    if let Some(steering) = &doc.steering {
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
                "Connections migrated out of a closing listener.",
                steering.migrations,
            ),
        ] {
            family(
                name,
                "counter",
                help,
                &mut std::iter::once((String::new(), value as f64)),
            );
        }
    }
    family(
        "steer_worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since the slot's process last answered.",
        &mut doc
            .workers
            .iter()
            .filter_map(|w| Some((slot(w.slot), w.health_ms? as f64 / 1000.0))),
    );
    out
}
