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
/// this process).
fn runnable_by(path: &Path, credentials: Option<(u32, u32)>) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = credentials.unwrap_or_else(|| unsafe { (libc::geteuid(), libc::getegid()) });
    let mode = meta.mode();
    let allowed = if uid == 0 {
        mode & 0o111 != 0
    } else if meta.uid() == uid {
        mode & 0o100 != 0
    } else if meta.gid() == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    };
    if allowed {
        return Ok(());
    }
    Err(match credentials {
        Some((uid, gid)) => format!(
            "{} is not executable by uid {uid} gid {gid} (mode {:o})",
            path.display(),
            mode & 0o7777
        ),
        None => format!(
            "{} is not executable (mode {:o})",
            path.display(),
            mode & 0o7777
        ),
    })
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
        assert!(check(script.as_os_str(), Some((65534, 65534))).is_ok());
        assert!(
            check(dir.as_os_str(), None)
                .expect_err("a directory")
                .contains("not a file")
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
