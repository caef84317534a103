//! `--pid-file`: the primary's pid, in a file the primary holds locked for its whole life.
//!
//! The lock (`flock(LOCK_EX)` on the open file) is what makes the file trustworthy: a
//! second primary pointed at the same file finds it locked and refuses to start instead
//! of overwriting it, and a primary removes the file at exit only while it still holds the
//! lock. A stale file left by a primary that was SIGKILLed is not locked, so the next one
//! takes it over.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why the pid file cannot be taken.
#[derive(Debug, Error)]
pub enum PidFileError {
    /// Another live primary holds it.
    #[error("{path} is held by a running primary{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held {
        /// The file.
        path: PathBuf,
        /// The pid written in it, if readable.
        pid: Option<u32>,
    },
    /// Its directory does not exist.
    #[error("the directory of {path} does not exist")]
    NoDirectory {
        /// The file.
        path: PathBuf,
    },
    /// It cannot be opened or locked.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The pid file, open and locked.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    /// Opens (creating) and locks `path` without blocking. Nothing is written yet.
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(PidFileError::NoDirectory {
                path: path.to_owned(),
            });
        }
        let open_error = |source| PidFileError::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_error)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(PidFileError::Held {
                    path: path.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            return Err(open_error(err));
        }
        Ok(PidFile {
            path: path.to_owned(),
            file,
        })
    }

    /// Takes over `file`, the pid file at `path` that the primary this one replaces holds
    /// locked: the lock is on the open file, which both now share, so it never lapses.
    /// Refused if `file` is not the file at `path` (a changed `pid-file`).
    pub fn adopt(path: &Path, file: File) -> Result<PidFile, PidFileError> {
        use std::os::unix::fs::MetadataExt;
        let same = match (std::fs::metadata(path), file.metadata()) {
            (Ok(on_disk), Ok(held)) => on_disk.dev() == held.dev() && on_disk.ino() == held.ino(),
            _ => false,
        };
        if !same {
            return Err(PidFileError::Open {
                path: path.to_owned(),
                source: io::Error::other("it is not the pid file the previous primary handed down"),
            });
        }
        Ok(PidFile {
            path: path.to_owned(),
            file,
        })
    }

    /// The open, locked file, to hand down to a successor.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Checks that `path` could be taken now (`steer check`), and lets it go again.
    pub fn probe(path: &Path) -> Result<(), PidFileError> {
        let existed = path.exists();
        let file = PidFile::acquire(path)?;
        if !existed {
            let _ = std::fs::remove_file(&file.path);
        }
        Ok(())
    }

    /// Writes this process's pid into the file.
    pub fn write_pid(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // One write over the old text, then cut what is left of it: a reader never sees
        // an empty file (pids of the same length, the usual case, are replaced in one
        // step).
        let text = format!("{}\n", std::process::id());
        self.file.write_all_at(text.as_bytes(), 0)?;
        self.file.set_len(text.len() as u64)?;
        self.file.flush()
    }

    /// Whether the file names this process now (read through the locked fd).
    pub fn names_this_process(&self) -> bool {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 32];
        let n = self.file.read_at(&mut buf, 0).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).trim() == std::process::id().to_string()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file (still holding the lock, so nobody else's file is removed).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_the_first_keeps_its_file() {
        let dir = std::env::temp_dir().join(format!("steer-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("steer.pid");
        let mut first = PidFile::acquire(&path).expect("first");
        first.write_pid().expect("write");
        match PidFile::acquire(&path) {
            Err(PidFileError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        assert!(matches!(
            PidFile::probe(&path),
            Err(PidFileError::Held { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(&path).expect("read").trim(),
            std::process::id().to_string()
        );
        first.remove();
        assert!(!path.exists());
        PidFile::probe(&path).expect("free again");
        assert!(!path.exists(), "a probe leaves no file behind");
        let missing = dir.join("no-such-dir/steer.pid");
        assert!(matches!(
            PidFile::acquire(&missing),
            Err(PidFileError::NoDirectory { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
