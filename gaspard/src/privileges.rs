//! Dropping root: after binding the port, the daemon (and so every worker it
//! starts) runs as `--user` / `--group`.

use nix::errno::Errno;
use nix::unistd::{setgid, setgroups, setuid, Gid, Group, Uid, User};

/// Why privileges could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot look up {what} {name}: {source}")]
    Lookup {
        what: &'static str,
        name: String,
        source: Errno,
    },
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error("--group {0}: no such group")]
    NoSuchGroup(String),
    #[error("cannot drop supplementary groups (is gaspard root?): {0}")]
    Groups(Errno),
    #[error("cannot change group: {0}")]
    Group(Errno),
    #[error("cannot become user {name}: {source}")]
    User { name: String, source: Errno },
    #[error("privileges could be regained after dropping them")]
    Regainable,
}

/// Who to become, looked up.
pub(crate) struct Target {
    user: User,
    gid: Gid,
}

/// Looks `user` and `group` up without changing anything (`--check` runs it
/// too, so that it refuses an unknown name as the daemon would). `None`
/// without `--user` (`--group` alone is refused by `Config::from_cli`).
pub(crate) fn look_up(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<Target>, PrivilegeError> {
    let Some(name) = user else {
        return Ok(None);
    };
    let user = User::from_name(name)
        .map_err(|source| PrivilegeError::Lookup {
            what: "user",
            name: name.to_string(),
            source,
        })?
        .ok_or_else(|| PrivilegeError::NoSuchUser(name.to_string()))?;
    let gid = match group {
        Some(name) => {
            Group::from_name(name)
                .map_err(|source| PrivilegeError::Lookup {
                    what: "group",
                    name: name.to_string(),
                    source,
                })?
                .ok_or_else(|| PrivilegeError::NoSuchGroup(name.to_string()))?
                .gid
        }
        None => user.gid,
    };
    Ok(Some(Target { user, gid }))
}

/// Switches to `user` (with its primary group, unless `group` is given). A
/// no-op without `user`.
pub(crate) fn drop_to(user: Option<&str>, group: Option<&str>) -> Result<(), PrivilegeError> {
    let Some(Target { user, gid }) = look_up(user, group)? else {
        return Ok(());
    };
    // Supplementary groups first, while still allowed to change them.
    setgroups(&[gid]).map_err(PrivilegeError::Groups)?;
    setgid(gid).map_err(PrivilegeError::Group)?;
    setuid(user.uid).map_err(|source| PrivilegeError::User {
        name: user.name.clone(),
        source,
    })?;
    if user.uid != Uid::from_raw(0) && setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::Regainable);
    }
    log::info!(
        "running as uid {} gid {}",
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    Ok(())
}
