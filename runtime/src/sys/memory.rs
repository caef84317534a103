//! A process's resident memory, from `/proc/<pid>/statm`.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// A process's `/proc/<pid>/statm`, opened once and re-read from offset 0 (the kernel
/// regenerates it on each read), so each check is one `pread(2)` into a stack buffer.
#[derive(Debug)]
pub struct ResidentMemory {
    statm: File,
    page_size: u64,
}

impl ResidentMemory {
    /// Opens `/proc/<pid>/statm` (`open(2)`); `None` if the process is already gone
    /// (`ENOENT`) or this process may not look at it.
    pub fn open(pid: i32) -> Option<ResidentMemory> {
        let statm = File::open(format!("/proc/{pid}/statm")).ok()?;
        Some(ResidentMemory {
            statm,
            page_size: page_size(),
        })
    }

    /// Resident memory in bytes now (`pread(2)`); `None` once the process has exited
    /// (`ESRCH`), or if the line cannot be parsed.
    pub fn bytes(&self) -> Option<u64> {
        let mut buf = [0u8; 128];
        let n = self.statm.read_at(&mut buf, 0).ok()?;
        resident_pages(&buf[..n]).map(|pages| pages.saturating_mul(self.page_size))
    }
}

/// Resident memory of process `pid` in bytes, read once; `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    ResidentMemory::open(i32::try_from(pid).ok()?)?.bytes()
}

/// `sysconf(_SC_PAGESIZE)`, or 4096 if the system will not say.
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// The second field of a `statm` line (resident pages), parsed without allocating.
fn resident_pages(statm: &[u8]) -> Option<u64> {
    let field = statm
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty())
        .nth(1)?;
    let mut pages: u64 = 0;
    for &b in field.iter().take_while(|b| b.is_ascii_digit()) {
        pages = pages.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_resident_field_is_the_second() {
        assert_eq!(resident_pages(b"6613 1460 1054 205 0 621 0\n"), Some(1460));
        assert_eq!(resident_pages(b"1 2\n"), Some(2));
        assert_eq!(resident_pages(b"1"), None);
    }

    #[test]
    fn own_resident_memory_is_read_and_tracks_growth() {
        let memory = ResidentMemory::open(std::process::id() as i32).expect("own statm");
        let before = memory.bytes().expect("rss");
        assert!(before > 0);
        let block = vec![1u8; 64 << 20];
        let after = memory.bytes().expect("rss");
        assert!(
            after >= before + (60 << 20),
            "64 MiB touched, rss {before} -> {after}"
        );
        drop(block);
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }
}
