//! Failures on request (`--demo-faults`), so the primary's supervision can be exercised
//! against a real worker: a hung event loop, a crash, a memory leak.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Memory kept by `/alloc`, alive until the process exits, as a leak would be.
static BALLAST: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The stride at which fresh ballast is written so that every page becomes resident.
const PAGE_BYTES: usize = 4096;

/// Stalls the calling thread, which is the worker's only one: the event loop stops
/// answering connections and pings, as a hung worker would.
pub fn hang(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Exits with status 1 at once, answering nothing.
pub fn crash() -> ! {
    tracing::warn!("crashing on request (/crash)");
    std::process::exit(1)
}

/// Grows resident memory by `mb` MiB and keeps it. The zeroed allocation costs no RSS until
/// written, so one byte of every page is.
pub fn grow(mb: u64) {
    let bytes = usize::try_from(mb)
        .unwrap_or(usize::MAX)
        .saturating_mul(1024 * 1024);
    let mut ballast = vec![0u8; bytes];
    for page in ballast.iter_mut().step_by(PAGE_BYTES) {
        *page = 1;
    }
    BALLAST
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(ballast);
}
