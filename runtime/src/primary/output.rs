//! Workers' stdout and stderr, tagged with who wrote them.
//!
//! Each worker's stdout and stderr are pipes whose read ends belong to the [`OutputReader`]
//! thread, never to the supervision loop. Whatever a worker's children write goes into the
//! same pipes, so their lines carry the worker's tag too. The thread joins partial writes
//! into lines, splits a line longer than [`MAX_LINE`] into marked pieces, escapes bytes
//! that are not UTF-8 (`\xNN`), and hands each line on:
//!
//! - **tagged**: to the primary's stderr, through the same bounded queue as the primary's
//!   own log ([`crate::logging::sink`]), as `[slot 2 pid 4242] text` (stderr lines say
//!   `stderr` after the pid), or with `--log-format json` as one object with `timestamp`,
//!   `slot`, `pid`, `generation`, `stream` and `message`;
//! - **journal**: to systemd-journald's native socket, one datagram per line with the
//!   fields `MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER`, `SYSLOG_PID`, `STEER_SLOT`,
//!   `STEER_PID`, `STEER_GENERATION` and `STEER_STREAM`, so `journalctl -u steer
//!   STEER_SLOT=2` works.
//!
//! Nothing here ever waits for the output: a line the queue (or the journal's socket)
//! cannot take is dropped whole and counted against its slot, shown in `/status` and
//! `/metrics`, with one warning per interval saying how many. The thread reads at most
//! [`BUDGET`] bytes of one pipe per turn, so a flooding worker cannot starve the others'
//! lines, and it always reads: a worker is never blocked by a slow sink or by another
//! worker's output, only, for as long as a read takes, by its own.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::{LogFormat, WorkerOutput};
use crate::logging::sink::{Origin, Sink};

/// The longest line passed on whole; a longer one is split into pieces this long, each
/// but the last marked as continued.
pub(crate) const MAX_LINE: usize = 16 * 1024;
/// Bytes read from one pipe per turn of the thread.
const BUDGET: usize = 64 * 1024;
/// journald's native socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Overrides [`JOURNAL_SOCKET`] (a test's stand-in for journald).
pub(crate) const ENV_JOURNAL_SOCKET: &str = "STEER_JOURNAL_SOCKET";
const WAKER: Token = Token(0);
/// What a tag adds to a line, at most (JSON's fields included).
const TAG_ROOM: usize = 192;

/// Which of a worker's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// fd 1.
    Stdout,
    /// fd 2.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Who wrote a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tag {
    /// The worker's slot.
    pub slot: usize,
    /// The worker's main process (its children's lines carry it too).
    pub pid: i32,
    /// Its generation.
    pub generation: u64,
}

/// Where lines go.
#[derive(Debug)]
enum Destination {
    /// The primary's stderr, through its log queue.
    Tagged { sink: Sink, format: LogFormat },
    /// journald's native protocol.
    Journal {
        socket: UnixDatagram,
        path: PathBuf,
        identifier: String,
    },
}

/// A worker's two pipes, before it is spawned: the write ends become its fds 1 and 2.
#[derive(Debug)]
pub(crate) struct Pipes {
    /// For the child's fd 1.
    pub stdout: OwnedFd,
    /// For the child's fd 2.
    pub stderr: OwnedFd,
    read: [OwnedFd; 2],
}

/// A pipe handed to the thread, with its writer's tag.
struct Watched {
    fd: OwnedFd,
    tag: Tag,
    stream: Stream,
}

/// The thread that reads every worker's output; its handle lives in the primary's host.
#[derive(Debug)]
pub(crate) struct OutputReader {
    new: Sender<Watched>,
    waker: Arc<Waker>,
    dropped: Arc<Mutex<Vec<u64>>>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("fd", &self.fd.as_raw_fd())
            .field("tag", &self.tag)
            .finish()
    }
}

impl OutputReader {
    /// Starts the reader for `mode` (`None` for `inherit`: workers write into the
    /// primary's own stdout and stderr). `identifier` names the program in the journal;
    /// `interval` spaces the warnings about dropped lines.
    pub(crate) fn start(
        mode: WorkerOutput,
        format: LogFormat,
        identifier: String,
        interval: Duration,
    ) -> io::Result<Option<OutputReader>> {
        let journal = match mode {
            WorkerOutput::Inherit => return Ok(None),
            WorkerOutput::Journal => true,
            WorkerOutput::Tagged => false,
            WorkerOutput::Auto => stderr_is_the_journal(),
        };
        let destination = if journal {
            let path = std::env::var_os(ENV_JOURNAL_SOCKET)
                .map_or_else(|| PathBuf::from(JOURNAL_SOCKET), PathBuf::from);
            let socket = UnixDatagram::unbound()?;
            socket.set_nonblocking(true)?;
            Destination::Journal {
                socket,
                path,
                identifier,
            }
        } else {
            let Some(sink) = crate::logging::sink() else {
                // No log queue (a library host that set up its own logging): workers keep
                // the primary's stdout and stderr.
                return Ok(None);
            };
            Destination::Tagged {
                sink: sink.clone(),
                format,
            }
        };
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (new, incoming) = std::sync::mpsc::channel();
        let dropped = Arc::new(Mutex::new(Vec::new()));
        let mut thread = Thread {
            poll,
            incoming,
            pipes: slab::Slab::new(),
            pending: Vec::new(),
            destination,
            dropped: dropped.clone(),
            reported: BTreeMap::new(),
            interval,
            next_report: Instant::now() + interval,
        };
        std::thread::Builder::new()
            .name("steer-output".into())
            .spawn(move || thread.run())?;
        Ok(Some(OutputReader {
            new,
            waker,
            dropped,
        }))
    }

    /// Two pipes for a worker about to be spawned (`pipe2(O_CLOEXEC)`; the spawn places
    /// the write ends at fds 1 and 2).
    pub(crate) fn pipes() -> io::Result<Pipes> {
        let (out_read, out_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Pipes {
            stdout: out_write,
            stderr: err_write,
            read: [out_read, err_read],
        })
    }

    /// Hands the read ends of a spawned worker's pipes to the thread.
    pub(crate) fn watch(&self, pipes: Pipes, tag: Tag) {
        let [stdout, stderr] = pipes.read;
        for (fd, stream) in [(stdout, Stream::Stdout), (stderr, Stream::Stderr)] {
            let _ = self.new.send(Watched { fd, tag, stream });
        }
        let _ = self.waker.wake();
    }

    /// Lines of `slot`'s workers dropped so far.
    pub(crate) fn dropped(&self, slot: usize) -> u64 {
        self.dropped
            .lock()
            .ok()
            .and_then(|d| d.get(slot).copied())
            .unwrap_or(0)
    }
}

/// Whether the primary's stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to
/// its `device:inode` (a child that inherited the variable with another stderr does not
/// match).
fn stderr_is_the_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(io::stderr().as_fd()) else {
        return false;
    };
    value.to_string_lossy() == format!("{}:{}", stat.st_dev, stat.st_ino)
}

/// One pipe being read.
struct Pipe {
    file: File,
    tag: Tag,
    stream: Stream,
    /// What came after the last newline.
    partial: Vec<u8>,
}

/// The thread's state.
struct Thread {
    poll: Poll,
    incoming: Receiver<Watched>,
    pipes: slab::Slab<Pipe>,
    /// Pipes with more to read than one turn's budget, or not read since their event.
    pending: Vec<usize>,
    destination: Destination,
    dropped: Arc<Mutex<Vec<u64>>>,
    /// Per slot, the count last warned about.
    reported: BTreeMap<usize, u64>,
    interval: Duration,
    next_report: Instant,
}

impl Thread {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = if self.pending.is_empty() {
                self.next_report.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if let Err(err) = self.poll.poll(&mut events, Some(timeout))
                && err.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!("worker output: the reader's poll failed: {err}; output is lost");
                return;
            }
            for event in &events {
                match event.token() {
                    WAKER => self.take_new(),
                    Token(n) => {
                        let key = n - 1;
                        if self.pipes.contains(key) && !self.pending.contains(&key) {
                            self.pending.push(key);
                        }
                    }
                }
            }
            for key in std::mem::take(&mut self.pending) {
                self.read_turn(key);
            }
            if Instant::now() >= self.next_report {
                self.report_drops();
                self.next_report = Instant::now() + self.interval;
            }
        }
    }

    fn take_new(&mut self) {
        while let Ok(watched) = self.incoming.try_recv() {
            let file = File::from(watched.fd);
            if set_nonblocking(&file).is_err() {
                continue;
            }
            let entry = self.pipes.vacant_entry();
            let key = entry.key();
            let registered = self.poll.registry().register(
                &mut SourceFd(&file.as_raw_fd()),
                Token(key + 1),
                Interest::READABLE,
            );
            if registered.is_err() {
                continue;
            }
            entry.insert(Pipe {
                file,
                tag: watched.tag,
                stream: watched.stream,
                partial: Vec::new(),
            });
            // Whatever it wrote before the registration is read now.
            self.pending.push(key);
        }
    }

    /// Reads one pipe up to the budget; keeps it pending if there may be more.
    fn read_turn(&mut self, key: usize) {
        let mut buf = [0u8; 16 * 1024];
        let mut taken = 0;
        loop {
            let Some(pipe) = self.pipes.get_mut(key) else {
                return;
            };
            match pipe.file.read(&mut buf) {
                Ok(0) => {
                    self.close(key);
                    return;
                }
                Ok(n) => {
                    taken += n;
                    self.take_bytes(key, &buf[..n]);
                    if taken >= BUDGET {
                        self.pending.push(key);
                        return;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.close(key);
                    return;
                }
            }
        }
    }

    /// Splits what was read into lines and passes each on.
    fn take_bytes(&mut self, key: usize, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let Some(pipe) = self.pipes.get_mut(key) else {
                return;
            };
            let room = MAX_LINE - pipe.partial.len();
            match bytes.iter().position(|&b| b == b'\n') {
                Some(end) if end <= room => {
                    pipe.partial.extend_from_slice(&bytes[..end]);
                    bytes = &bytes[end + 1..];
                    self.emit(key, false);
                }
                _ if bytes.len() > room => {
                    // A line longer than MAX_LINE (more bytes, and no newline where the
                    // piece ends): this piece goes now, marked.
                    pipe.partial.extend_from_slice(&bytes[..room]);
                    bytes = &bytes[room..];
                    self.emit(key, true);
                }
                _ => {
                    pipe.partial.extend_from_slice(bytes);
                    return;
                }
            }
        }
    }

    /// The pipe's writers are all gone: what is left is a last line.
    fn close(&mut self, key: usize) {
        if self.pipes.get(key).is_some_and(|p| !p.partial.is_empty()) {
            self.emit(key, false);
        }
        if self.pipes.contains(key) {
            let pipe = self.pipes.remove(key);
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&pipe.file.as_raw_fd()));
        }
    }

    /// Passes the pipe's `partial` on as one line (a piece of a longer one if `split`).
    fn emit(&mut self, key: usize, split: bool) {
        let Some(pipe) = self.pipes.get_mut(key) else {
            return;
        };
        let (tag, stream) = (pipe.tag, pipe.stream);
        if let Destination::Tagged { sink, .. } = &self.destination
            && !sink.has_room(Origin::Worker(tag.slot), pipe.partial.len() + TAG_ROOM)
        {
            // Dropped anyway: not worth escaping and formatting.
            pipe.partial.clear();
            self.count_drop(tag.slot);
            return;
        }
        let text = escape(&pipe.partial);
        pipe.partial.clear();
        let delivered = match &self.destination {
            Destination::Tagged { sink, format } => {
                let line = match format {
                    LogFormat::Text => text_line(tag, stream, &text, split),
                    LogFormat::Json => json_line(tag, stream, &text, split),
                };
                sink.push(Origin::Worker(tag.slot), line)
            }
            Destination::Journal {
                socket,
                path,
                identifier,
            } => {
                let datagram = journal_entry(tag, stream, &text, split, identifier);
                socket.send_to(&datagram, path).is_ok()
            }
        };
        if !delivered {
            self.count_drop(tag.slot);
        }
    }

    fn count_drop(&self, slot: usize) {
        if let Ok(mut dropped) = self.dropped.lock() {
            if dropped.len() <= slot {
                dropped.resize(slot + 1, 0);
            }
            dropped[slot] = dropped[slot].saturating_add(1);
        }
    }

    /// One warning per slot per interval, if it dropped lines since the last one.
    fn report_drops(&mut self) {
        let Ok(dropped) = self.dropped.lock().map(|d| d.clone()) else {
            return;
        };
        for (slot, &count) in dropped.iter().enumerate() {
            let before = self.reported.insert(slot, count).unwrap_or(0);
            if count > before {
                tracing::warn!(
                    slot,
                    dropped = count - before,
                    "dropped {} lines of worker output in the last {} (the output cannot keep \
                     up with the workers)",
                    count - before,
                    humantime::format_duration(self.interval)
                );
            }
        }
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// The line's text, with every byte that is not part of valid UTF-8 written `\xNN`.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

/// `[slot 2 pid 4242] text`, `[slot 2 pid 4242 stderr] text`; a piece of a split line ends
/// with ` [continued]`.
fn text_line(tag: Tag, stream: Stream, text: &str, split: bool) -> Vec<u8> {
    let stream = match stream {
        Stream::Stdout => "",
        Stream::Stderr => " stderr",
    };
    let more = if split { " [continued]" } else { "" };
    format!("[slot {} pid {}{stream}] {text}{more}\n", tag.slot, tag.pid).into_bytes()
}

fn json_line(tag: Tag, stream: Stream, text: &str, split: bool) -> Vec<u8> {
    let mut object = serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        "slot": tag.slot,
        "pid": tag.pid,
        "generation": tag.generation,
        "stream": stream.name(),
        "message": text,
    });
    if split {
        object["continued"] = serde_json::Value::Bool(true);
    }
    let mut line = object.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// One entry of journald's native protocol: `KEY=value` lines, and `MESSAGE` in the
/// binary form (name, newline, 64-bit little-endian length, bytes, newline), which takes
/// any byte.
fn journal_entry(tag: Tag, stream: Stream, text: &str, split: bool, identifier: &str) -> Vec<u8> {
    let mut entry = Vec::with_capacity(text.len() + 160);
    entry.extend_from_slice(b"MESSAGE\n");
    entry.extend_from_slice(&(text.len() as u64).to_le_bytes());
    entry.extend_from_slice(text.as_bytes());
    entry.push(b'\n');
    let priority = match stream {
        Stream::Stdout => 6,
        Stream::Stderr => 4,
    };
    let identifier: String = identifier.chars().filter(|c| *c != '\n').collect();
    let fields = [
        format!("PRIORITY={priority}"),
        format!("SYSLOG_IDENTIFIER={identifier}"),
        format!("SYSLOG_PID={}", tag.pid),
        format!("STEER_SLOT={}", tag.slot),
        format!("STEER_PID={}", tag.pid),
        format!("STEER_GENERATION={}", tag.generation),
        format!("STEER_STREAM={}", stream.name()),
    ];
    for field in fields {
        entry.extend_from_slice(field.as_bytes());
        entry.push(b'\n');
    }
    if split {
        entry.extend_from_slice(b"STEER_CONTINUED=1\n");
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: Tag = Tag {
        slot: 2,
        pid: 4242,
        generation: 3,
    };

    #[test]
    fn invalid_utf8_is_escaped_not_dropped() {
        assert_eq!(
            escape(b"ok \xff\xfe done \xe2\x82"),
            "ok \\xff\\xfe done \\xe2\\x82"
        );
        assert_eq!(escape("naïve ✓".as_bytes()), "naïve ✓");
    }

    #[test]
    fn a_text_line_names_slot_pid_and_stream() {
        assert_eq!(
            text_line(TAG, Stream::Stdout, "hello", false),
            b"[slot 2 pid 4242] hello\n"
        );
        assert_eq!(
            text_line(TAG, Stream::Stderr, "oops", true),
            b"[slot 2 pid 4242 stderr] oops [continued]\n"
        );
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let line = json_line(TAG, Stream::Stderr, "a \"quoted\" line", false);
        let value: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(value["slot"], 2);
        assert_eq!(value["pid"], 4242);
        assert_eq!(value["generation"], 3);
        assert_eq!(value["stream"], "stderr");
        assert_eq!(value["message"], "a \"quoted\" line");
        assert!(value["timestamp"].is_string());
        assert!(value.get("continued").is_none());
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn a_journal_entry_carries_the_fields_and_any_message() {
        let entry = journal_entry(TAG, Stream::Stdout, "line", false, "node");
        let mut expected = b"MESSAGE\n".to_vec();
        expected.extend_from_slice(&4u64.to_le_bytes());
        expected.extend_from_slice(b"line\nPRIORITY=6\nSYSLOG_IDENTIFIER=node\nSYSLOG_PID=4242\nSTEER_SLOT=2\nSTEER_PID=4242\nSTEER_GENERATION=3\nSTEER_STREAM=stdout\n");
        assert_eq!(entry, expected);
    }
}
