//! Shared-memory views of `BPF_F_MMAPABLE` array maps: the primary writes the Maglev table
//! through one, each worker publishes its load through another. A store into the mapping is
//! what the program reads on its next run; no system call per update.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

/// A read-write shared mapping of an array map's values.
#[derive(Debug)]
pub struct SharedArray {
    base: NonNull<u8>,
    len: usize,
    stride: usize,
}

// SAFETY: the mapping is plain shared memory; every access below is an atomic load or store,
// so concurrent use from threads (and from the kernel) is sound.
unsafe impl Send for SharedArray {}
// SAFETY: as above; `&self` methods only perform atomic accesses.
unsafe impl Sync for SharedArray {}

impl SharedArray {
    /// Maps the values of an array map of `entries` values of `value_size` bytes (the
    /// kernel lays them out every `value_size` rounded up to 8 bytes).
    pub fn map(fd: BorrowedFd<'_>, value_size: usize, entries: usize) -> io::Result<SharedArray> {
        let stride = value_size.next_multiple_of(8);
        let page = page_size();
        let len = (stride * entries).next_multiple_of(page);
        // SAFETY: a fresh shared mapping of an fd we borrow for the call; the kernel checks
        // that `len` fits the map and that the map is mmapable.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(SharedArray { base, len, stride })
    }

    /// Byte offset of value `index`: the kernel stores array values every `value_size`
    /// rounded up to 8 bytes, so a 4-byte value takes 8.
    pub fn offset_of(&self, index: usize) -> usize {
        index * self.stride
    }

    /// The u64 at byte `offset` (8-byte aligned, inside the mapping).
    pub fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.len,
            "u64 at {offset} out of range"
        );
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as self
        // and is only ever accessed atomically.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// The u32 at byte `offset` (4-byte aligned, inside the mapping).
    pub fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.len,
            "u32 at {offset} out of range"
        );
        // SAFETY: as for `u64_at`.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// The u16 at byte `offset` (2-byte aligned, inside the mapping).
    pub fn u16_at(&self, offset: usize) -> &AtomicU16 {
        assert!(
            offset.is_multiple_of(2) && offset + 2 <= self.len,
            "u16 at {offset} out of range"
        );
        // SAFETY: as for `u64_at`.
        unsafe { AtomicU16::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// Stores `value` into the u64 at `offset`.
    pub fn store_u64(&self, offset: usize, value: u64) {
        self.u64_at(offset).store(value, Ordering::Relaxed);
    }
}

impl Drop for SharedArray {
    fn drop(&mut self) {
        // SAFETY: exactly the region mapped in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096).max(1)
}
