//! Files under `$TMPDIR/steer-tests/`: the log a cluster under test writes, and config
//! files tests write for `steer --config`.

use std::env;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

/// How many trailing lines of the log a panic message shows.
const TAIL_LINES: usize = 60;

/// A log file under `$TMPDIR/steer-tests/`, named after the test that created it. It is
/// removed when dropped, unless the thread is panicking: a failed test keeps its log and
/// prints where it is.
#[derive(Debug)]
pub(crate) struct LogFile {
    path: PathBuf,
}

impl LogFile {
    /// Creates a fresh, empty log file and returns it with a handle open for writing.
    pub(crate) fn create() -> (LogFile, File) {
        let path = unique_path("log");
        let file = File::create(&path)
            .unwrap_or_else(|e| panic!("creating the log file {}: {e}", path.display()));
        (LogFile { path }, file)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The whole log so far (lossy UTF-8; empty if unreadable).
    pub(crate) fn read(&self) -> String {
        fs::read(&self.path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of the log under a header naming the file, for panic messages.
    pub(crate) fn tail(&self) -> String {
        let log = self.read();
        let lines: Vec<&str> = log.lines().collect();
        let skipped = lines.len().saturating_sub(TAIL_LINES);
        let mut tail = format!(
            "--- steer log {} ({} lines{}) ---\n",
            self.path.display(),
            lines.len(),
            if skipped > 0 { ", last shown" } else { "" }
        );
        for line in &lines[skipped..] {
            tail.push_str(line);
            tail.push('\n');
        }
        tail.push_str("--- end of steer log ---");
        tail
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        remove_unless_panicking(&self.path, "steer log");
    }
}

/// A file with given contents, e.g. a TOML config for `steer run --config`. Removed when
/// dropped, unless the thread is panicking (then kept for inspection).
///
/// ```no_run
/// # use steer_tests::{Cluster, TempFile};
/// let config = TempFile::new("toml", "workers = 2\n");
/// let cluster = Cluster::start(&["--config", config.as_arg()]);
/// ```
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a new file named after the current test, ending in
    /// `.<extension>`.
    ///
    /// # Panics
    ///
    /// If the file cannot be written.
    pub fn new(extension: &str, contents: impl AsRef<[u8]>) -> TempFile {
        let path = unique_path(extension);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        TempFile { path }
    }

    /// [`new`](TempFile::new), with mode 0755.
    ///
    /// # Panics
    ///
    /// If the file cannot be written.
    pub fn executable(extension: &str, contents: impl AsRef<[u8]>) -> TempFile {
        use std::os::unix::fs::PermissionsExt;
        let file = TempFile::new(extension, contents);
        fs::set_permissions(&file.path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", file.path.display()));
        file
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a command-line argument.
    ///
    /// # Panics
    ///
    /// If the temporary directory's path is not UTF-8.
    pub fn as_arg(&self) -> &str {
        self.path
            .to_str()
            .unwrap_or_else(|| panic!("temporary path {} is not UTF-8", self.path.display()))
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        remove_unless_panicking(&self.path, "temporary file");
    }
}

/// A path in `$TMPDIR/steer-tests/` no other call returns: the current test's name (libtest
/// names each test's thread after the test), this process's id and a counter.
fn unique_path(extension: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = env::temp_dir().join("steer-tests");
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating the directory {}: {e}", dir.display()));
    let test: String = thread::current()
        .name()
        .unwrap_or("steer")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{test}-{}-{n}.{extension}", process::id()))
}

fn remove_unless_panicking(path: &Path, what: &str) {
    if thread::panicking() {
        eprintln!("{what} kept at {}", path.display());
    } else {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn tail_shows_the_last_lines_and_the_file_goes_away_on_drop() {
        let (log, mut file) = LogFile::create();
        assert!(
            log.path()
                .to_string_lossy()
                .contains("tail_shows_the_last_lines"),
            "named after the test: {}",
            log.path().display()
        );
        for i in 0..100 {
            writeln!(file, "line {i}").expect("write log");
        }
        let tail = log.tail();
        assert!(tail.contains("line 99\n"), "{tail}");
        assert!(tail.contains("line 40\n"), "{tail}");
        assert!(!tail.contains("line 39\n"), "{tail}");
        assert_eq!(log.read().lines().count(), 100);
        let path = log.path().to_owned();
        drop(log);
        assert!(!path.exists());
    }

    #[test]
    fn temp_file_holds_its_contents_until_dropped() {
        let file = TempFile::new("toml", "workers = 2\n");
        assert!(file.as_arg().ends_with(".toml"));
        assert_eq!(
            fs::read_to_string(&file).expect("read back"),
            "workers = 2\n"
        );
        let path = file.path().to_owned();
        drop(file);
        assert!(!path.exists());
    }
}
