//! What a worker may do: the user it runs as, its resource limits, and no way back up.
//!
//! The primary stays as it was started (root, or with `CAP_BPF` and friends): it loads
//! and updates the eBPF program, signals workers and reads their `/proc` entries. Workers
//! give up what they do not need:
//!
//! - every worker gets `PR_SET_NO_NEW_PRIVS` before `execve`, so neither it nor anything
//!   it runs can gain privileges through a set-uid binary or file capabilities;
//! - `--worker-nofile` and `--worker-memory-limit` are `RLIMIT_NOFILE` and `RLIMIT_AS`,
//!   set before `execve` (see `primary::spawn`);
//! - `--user`/`--group`: an external program (`-- COMMAND`) receives its socket already
//!   bound, so it switches before `execve`; a built-in or library worker binds its own
//!   socket, so it switches in [`drop_after_registration`], after the primary has taken
//!   its registration and before any of the user's code runs. A port below 1024 therefore
//!   works with an unprivileged worker either way.
//!
//! Changing credentials clears the parent-death signal (`commit_creds`), so it is set again
//! right after: a worker must never outlive its primary.

use std::io;

use nix::unistd::{Gid, Uid, getppid, setgid, setgroups, setuid};

use crate::config::Credentials;

/// Environment variable carrying the uid a re-executed worker switches to.
pub(crate) const ENV_UID: &str = "STEER_WORKER_UID";
/// Environment variable carrying the gid a re-executed worker switches to.
pub(crate) const ENV_GID: &str = "STEER_WORKER_GID";

/// The variables that tell a re-executed worker whom to become.
pub(crate) fn env_for(credentials: &Credentials) -> [(&'static str, String); 2] {
    [
        (ENV_UID, credentials.uid.to_string()),
        (ENV_GID, credentials.gid.to_string()),
    ]
}

/// In a re-executed worker whose socket is registered: switch to the uid and gid the
/// primary passed in the environment (`setgroups([gid])`, `setgid`, `setuid`), then ask
/// again to die with the primary. Does nothing when no switch was asked for.
///
/// Fails if a call fails (not root, no `CAP_SETUID`/`CAP_SETGID`) or if the process can
/// still become root again afterwards; the worker must then not serve.
pub fn drop_after_registration() -> Result<(), String> {
    let (Some(uid), Some(gid)) = (env_id(ENV_UID)?, env_id(ENV_GID)?) else {
        return Ok(());
    };
    let parent = getppid();
    switch_to(uid, gid).map_err(|e| format!("cannot switch to uid {uid} gid {gid}: {e}"))?;
    if setuid(Uid::from_raw(0)).is_ok() && uid != 0 {
        return Err(format!(
            "switched to uid {uid}, but could become root again"
        ));
    }
    die_with_parent(parent).map_err(|e| format!("cannot set the parent-death signal: {e}"))
}

fn env_id(name: &str) -> Result<Option<u32>, String> {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={text:?} is not a numeric id")),
        Err(_) => Ok(None),
    }
}

/// `setgroups([gid])`, `setgid(gid)`, `setuid(uid)`: real, effective and saved ids all
/// change, and supplementary groups are reduced to `gid`.
fn switch_to(uid: u32, gid: u32) -> nix::Result<()> {
    let gid = Gid::from_raw(gid);
    setgroups(&[gid])?;
    setgid(gid)?;
    setuid(Uid::from_raw(uid))
}

/// `prctl(PR_SET_PDEATHSIG, SIGKILL)`, then checks the parent is still `parent` (it may
/// have died before the call, and then nobody would send the signal).
fn die_with_parent(parent: nix::unistd::Pid) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no pointers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if getppid() != parent {
        std::process::exit(0);
    }
    Ok(())
}
