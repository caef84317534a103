//! Finding the worker program the way `execvp` would, and checking that it can run, so
//! `steer check` and `steer run` refuse a COMMAND that would only crash-loop.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Finds `name` on `PATH` the way `execvp` would, or returns it as given if it has a `/`.
pub fn resolve(name: &OsStr) -> io::Result<PathBuf> {
    if name.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| runnable_by(candidate, None).is_ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found on PATH", name.to_string_lossy()),
            )
        })
}

/// Whether `name` resolves to a file the workers can execute: by this process, or by
/// `credentials` (`(uid, gid)`, the only group an external worker keeps). A reason for
/// the operator otherwise.
pub fn check(name: &OsStr, credentials: Option<(u32, u32)>) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("the command is empty".into());
    }
    let path = if name.as_bytes().contains(&b'/') {
        PathBuf::from(name)
    } else {
        let search =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&search)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| format!("not found on PATH ({})", search.to_string_lossy()))?
    };
    runnable_by(&path, credentials)?;
    Ok(path)
}

/// `path` is a regular file with an execute bit that applies to `credentials` (or to
/// this process), in directories they may search, and a script's `#!` interpreter passes
/// the same checks.
fn runnable_by(path: &Path, credentials: Option<(u32, u32)>) -> Result<(), String> {
    runnable_at_depth(path, credentials, 0)
}

fn runnable_at_depth(
    path: &Path,
    credentials: Option<(u32, u32)>,
    depth: usize,
) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = credentials.unwrap_or_else(|| unsafe { (libc::geteuid(), libc::getegid()) });
    let who = match credentials {
        Some((uid, gid)) => format!(" by uid {uid} gid {gid}"),
        None => String::new(),
    };
    if !permits(&meta, uid, gid) {
        return Err(format!(
            "{} is not executable{who} (mode {:o})",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    // execve needs search permission on every directory on the way, too.
    let absolute = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for dir in absolute.ancestors().skip(1) {
        let dir_meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !permits(&dir_meta, uid, gid) {
            return Err(format!(
                "{} is in {}, which cannot be searched{who} (mode {:o})",
                path.display(),
                dir.display(),
                dir_meta.mode() & 0o7777
            ));
        }
    }
    // A script runs only if its interpreter does (execve's ENOENT for a bad `#!` line
    // names the script, which misleads); `#!` lines nest at most a few levels.
    if let Some(interpreter) = interpreter_of(path)
        && depth < 4
    {
        runnable_at_depth(&interpreter, credentials, depth + 1)
            .map_err(|reason| format!("{}: its interpreter {reason}", path.display()))?;
    }
    Ok(())
}

/// The execute (or, for a directory, search) bit that applies to `uid`/`gid`.
fn permits(meta: &std::fs::Metadata, uid: u32, gid: u32) -> bool {
    let mode = meta.mode();
    if uid == 0 {
        // Root needs one execute bit on a file and none on a directory.
        meta.is_dir() || mode & 0o111 != 0
    } else if meta.uid() == uid {
        mode & 0o100 != 0
    } else if meta.gid() == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The interpreter named by a `#!` first line, if `path` starts with one.
fn interpreter_of(path: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let read = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let line = head[..read].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let name = line
        .split(|b| b.is_ascii_whitespace())
        .find(|word| !word.is_empty())?;
    Some(PathBuf::from(OsStr::from_bytes(name)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn missing_unexecutable_and_foreign_programs_are_named() {
        assert!(check(OsStr::new("sh"), None).is_ok());
        let missing = check(OsStr::new("no-such-program-steer"), None).expect_err("missing");
        assert!(missing.contains("not found on PATH"), "{missing}");
        let dir = std::env::temp_dir().join(format!("steer-program-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let script = dir.join("app.sh");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = check(script.as_os_str(), None).expect_err("no x bit");
        assert!(err.contains("not executable"), "{err}");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        // Owned by this user, executable by its owner only: not by nobody.
        let owner = std::fs::metadata(&script).expect("meta").uid();
        if owner != 65534 {
            let err = check(script.as_os_str(), Some((65534, 65534))).expect_err("not nobody's");
            assert!(err.contains("uid 65534"), "{err}");
        }
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(check(script.as_os_str(), Some((65534, 65534))).is_ok());
        // In a directory nobody may not search: execve would fail with EACCES.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        if owner != 65534 {
            let err = check(script.as_os_str(), Some((65534, 65534))).expect_err("hidden");
            assert!(err.contains("cannot be searched"), "{err}");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // A script whose interpreter does not exist.
        let orphan = dir.join("orphan.sh");
        std::fs::write(&orphan, "#!/no/such/interpreter -x\n").expect("write");
        std::fs::set_permissions(&orphan, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = check(orphan.as_os_str(), None).expect_err("no interpreter");
        assert!(
            err.contains("its interpreter") && err.contains("/no/such/interpreter"),
            "{err}"
        );
        assert!(
            check(dir.as_os_str(), None)
                .expect_err("a directory")
                .contains("not a file")
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
