//! Dropping root: after binding the port, the daemon (and so every worker it
//! starts) runs as `--user` / `--group`.

use anyhow::{anyhow, Context as _};
use nix::unistd::{setgid, setgroups, setuid, Gid, Group, Uid, User};

/// Switches to `user` (with its primary group, unless `group` is given) or to
/// `group` alone. A no-op when neither is given.
pub fn drop_to(user: Option<&str>, group: Option<&str>) -> anyhow::Result<()> {
    if user.is_none() && group.is_none() {
        return Ok(());
    }
    let user = user
        .map(|name| {
            User::from_name(name)
                .with_context(|| format!("cannot look up user {name}"))?
                .ok_or_else(|| anyhow!("--user {name}: no such user"))
        })
        .transpose()?;
    let gid: Gid = match group {
        Some(name) => {
            Group::from_name(name)
                .with_context(|| format!("cannot look up group {name}"))?
                .ok_or_else(|| anyhow!("--group {name}: no such group"))?
                .gid
        }
        None => user.as_ref().expect("one of them is given").gid,
    };
    // Supplementary groups first, while still allowed to change them.
    setgroups(&[gid]).context("cannot drop supplementary groups (is gaspard root?)")?;
    setgid(gid).context("cannot change group")?;
    if let Some(user) = &user {
        setuid(user.uid).with_context(|| format!("cannot become user {}", user.name))?;
        if user.uid != Uid::from_raw(0) && setuid(Uid::from_raw(0)).is_ok() {
            return Err(anyhow!("privileges could be regained after dropping them"));
        }
    }
    log::info!(
        "running as uid {} gid {}",
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    Ok(())
}
