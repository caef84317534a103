//! How many connections a demo worker keeps, and which ones it lets go when it needs room.
//!
//! Each connection costs a file descriptor. A worker that accepts until `accept` fails with
//! `EMFILE` has none left for anything else, and every new client waits behind the ones
//! that hold the descriptors while doing nothing. So a worker keeps at most
//! [`connection_cap`] connections, a little below its descriptor limit, and when it is full
//! and more are queued it closes idle connections first, the longest idle first, a batch at
//! a time: what nginx does with its reusable connections (`ngx_drain_connections`). Idle
//! means nothing in progress: a connection that has sent nothing yet, or a keep-alive
//! connection between requests.

/// Descriptors kept free beside the connections: standard streams, the IPC socket, the
/// poll, the listener, the load map, and a margin for a burst of accepts.
pub const RESERVED_FDS: usize = 16;

/// Most idle connections closed at once when the worker needs room.
pub const SHED_BATCH: usize = 32;

/// The connection cap for a descriptor limit of `nofile` with `open` descriptors already in
/// use: what is left after [`RESERVED_FDS`], at least one.
pub fn connection_cap(nofile: u64, open: usize) -> usize {
    usize::try_from(nofile)
        .unwrap_or(usize::MAX)
        .saturating_sub(open.saturating_add(RESERVED_FDS))
        .max(1)
}

/// How many of `idle` idle connections to close for room: an eighth, at least one and at
/// most [`SHED_BATCH`] (nginx's rule), so a full worker makes room for a burst without
/// closing every idle client at once.
pub fn shed_count(idle: usize) -> usize {
    (idle / 8).clamp(1, SHED_BATCH).min(idle)
}

/// This process's connection cap: its soft `RLIMIT_NOFILE` (`getrlimit`) and the
/// descriptors open now (`/proc/self/fd`).
pub fn process_connection_cap() -> usize {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _hard)| soft);
    // The directory's own descriptor is in the listing too.
    let open = std::fs::read_dir("/proc/self/fd").map_or(RESERVED_FDS, |dir| dir.count());
    connection_cap(nofile, open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_the_descriptor_limit() {
        assert_eq!(connection_cap(1024, 8), 1000);
        assert_eq!(connection_cap(16, 8), 1);
        assert_eq!(connection_cap(u64::MAX, 8), usize::MAX - 24);
        assert!(process_connection_cap() >= 1);
    }

    #[test]
    fn an_eighth_of_the_idle_connections_goes_at_most_a_batch_at_a_time() {
        assert_eq!(shed_count(0), 0);
        assert_eq!(shed_count(1), 1);
        assert_eq!(shed_count(20), 2);
        assert_eq!(shed_count(10_000), SHED_BATCH);
    }
}
