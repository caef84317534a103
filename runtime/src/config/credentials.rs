//! The user and group a worker drops to, looked up once when the configuration is checked.

/// The user and group a worker drops to (`--user`, `--group`), resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user as given (name or id), for messages.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// The group's gid: `--group`, else the user's primary group.
    pub gid: u32,
}

impl Credentials {
    /// Looks up `user` (a name, or a numeric uid) and `group` (a name or gid; default the
    /// user's primary group) in the system's user database (`getpwnam`, `getgrnam`).
    pub fn resolve(user: &str, group: Option<&str>) -> Result<Credentials, (&'static str, String)> {
        use nix::unistd::{Gid, Group, Uid, User};
        let numeric = user.parse::<u32>().ok();
        let entry = match numeric {
            Some(uid) => User::from_uid(Uid::from_raw(uid)),
            None => User::from_name(user),
        }
        .map_err(|e| ("user", format!("cannot look up the user: {e}")))?;
        let uid = match (&entry, numeric) {
            (Some(entry), _) => entry.uid.as_raw(),
            (None, Some(uid)) => uid,
            (None, None) => {
                return Err((
                    "user",
                    "no such user on this system (see /etc/passwd, or give a numeric uid)".into(),
                ));
            }
        };
        let gid = match group {
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(group)
                    .map_err(|e| ("group", format!("cannot look up the group: {e}")))?
                    .map(|g| g.gid.as_raw())
                    .ok_or((
                        "group",
                        "no such group on this system (see /etc/group, or give a numeric gid)"
                            .to_string(),
                    ))?,
            },
            None => entry.map(|e| Gid::as_raw(e.gid)).ok_or((
                "user",
                "this uid has no entry in /etc/passwd, so no primary group: give --group as well"
                    .to_string(),
            ))?,
        };
        Ok(Credentials {
            user: user.to_owned(),
            uid,
            gid,
        })
    }
}
