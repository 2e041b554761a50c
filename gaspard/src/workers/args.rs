//! The command line between the supervisor, which starts a worker, and
//! the worker process (`crate::worker`), which parses it.

use std::os::fd::RawFd;
use std::path::PathBuf;

/// The argument that selects worker mode.
pub const WORKER_ARG: &str = "__worker";

/// The handler config travels in the environment, which only the owner can
/// read, rather than on the command line, which `ps` shows to everyone.
pub const CONFIG_ENV: &str = "GASPARD_WORKER_HANDLER_CONFIG";

/// Why a worker's command line is not one the daemon wrote.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("worker: missing {0}")]
    Missing(&'static str),
    #[error("worker: bad {0}")]
    Bad(&'static str),
}

/// How a worker reaches the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkArgs {
    /// Its ends of a local link (`link.rs`), inherited open: the socket it
    /// reads requests from, and the pipe it writes replies to.
    Local {
        requests_fd: RawFd,
        replies_fd: RawFd,
    },
    /// zmq endpoints (`zmq_link.rs`): the one it binds to take requests,
    /// and the daemon's, which it connects to with its replies.
    Zmq { requests: String, replies: String },
}

/// What the daemon tells a worker on its command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub link: LinkArgs,
    /// Its claims (`claims.rs`), a memfd inherited open.
    pub claims_fd: RawFd,
    pub incarnation: u64,
    /// The slot it runs in (its place in the daemon's tables).
    pub slot: usize,
    pub daemon_pid: i32,
    /// The operator's handler file, as named in messages.
    pub handler: PathBuf,
    /// The snapshot of it that this worker loads.
    pub load_from: PathBuf,
    pub handler_config: String,
}

impl WorkerArgs {
    /// What every worker of a daemon is told: the fds and incarnation are
    /// filled in for each.
    pub(crate) fn template(handler: PathBuf, handler_config: String) -> WorkerArgs {
        WorkerArgs {
            link: LinkArgs::Local {
                requests_fd: -1,
                replies_fd: -1,
            },
            claims_fd: -1,
            incarnation: 0,
            slot: 0,
            daemon_pid: std::process::id() as i32,
            handler,
            load_from: PathBuf::new(),
            handler_config,
        }
    }

    /// The command-line arguments after the program name.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let (kind, requests, replies) = match &self.link {
            LinkArgs::Local {
                requests_fd,
                replies_fd,
            } => ("local", requests_fd.to_string(), replies_fd.to_string()),
            LinkArgs::Zmq { requests, replies } => ("zmq", requests.clone(), replies.clone()),
        };
        vec![
            WORKER_ARG.into(),
            kind.into(),
            requests.into(),
            replies.into(),
            self.claims_fd.to_string().into(),
            self.incarnation.to_string().into(),
            self.slot.to_string().into(),
            self.daemon_pid.to_string().into(),
            self.handler.clone().into(),
            self.load_from.clone().into(),
        ]
    }

    /// Parses what [`Self::to_args`] wrote (after `__worker`). Every number
    /// is checked for its own type: an fd or a pid out of range is refused,
    /// never truncated into another one.
    pub fn parse(
        mut args: impl Iterator<Item = std::ffi::OsString>,
    ) -> Result<WorkerArgs, ArgsError> {
        let mut next = |what: &'static str| args.next().ok_or(ArgsError::Missing(what));
        fn number<T: std::str::FromStr + PartialOrd + Default>(
            text: std::ffi::OsString,
            what: &'static str,
        ) -> Result<T, ArgsError> {
            text.to_str()
                .and_then(|t| t.parse::<T>().ok())
                .filter(|n| *n >= T::default())
                .ok_or(ArgsError::Bad(what))
        }
        let link = match next("link")?.to_str() {
            Some("local") => LinkArgs::Local {
                requests_fd: number(next("requests fd")?, "requests fd")?,
                replies_fd: number(next("replies fd")?, "replies fd")?,
            },
            Some("zmq") => {
                let mut endpoint =
                    |what| next(what)?.into_string().map_err(|_| ArgsError::Bad(what));
                LinkArgs::Zmq {
                    requests: endpoint("requests endpoint")?,
                    replies: endpoint("replies endpoint")?,
                }
            }
            _ => return Err(ArgsError::Bad("link")),
        };
        let claims_fd: RawFd = number(next("claims fd")?, "claims fd")?;
        let incarnation: u64 = number(next("incarnation")?, "incarnation")?;
        let slot: usize = number(next("slot")?, "slot")?;
        let daemon_pid: i32 = number(next("daemon pid")?, "daemon pid")?;
        let handler = PathBuf::from(next("handler")?);
        let load_from = PathBuf::from(next("handler snapshot")?);
        let handler_config = std::env::var(CONFIG_ENV).unwrap_or_default();
        Ok(WorkerArgs {
            link,
            claims_fd,
            incarnation,
            slot,
            daemon_pid,
            handler,
            load_from,
            handler_config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(link: LinkArgs) -> WorkerArgs {
        let args = WorkerArgs {
            link,
            claims_fd: 5,
            incarnation: 7,
            slot: 3,
            ..WorkerArgs::template("h.so".into(), String::new())
        };
        let written = args.to_args();
        assert_eq!(written[0], WORKER_ARG);
        WorkerArgs::parse(written.into_iter().skip(1)).unwrap()
    }

    #[test]
    fn either_link_survives_the_command_line() {
        for link in [
            LinkArgs::Local {
                requests_fd: 3,
                replies_fd: 4,
            },
            LinkArgs::Zmq {
                requests: "ipc:///run/x/worker-7.zmq".into(),
                replies: "ipc:///run/x/replies.zmq".into(),
            },
        ] {
            let parsed = round_trip(link.clone());
            assert_eq!(
                (
                    parsed.link,
                    parsed.claims_fd,
                    parsed.incarnation,
                    parsed.slot
                ),
                (link, 5, 7, 3)
            );
        }
    }

    #[test]
    fn an_unknown_link_or_a_negative_fd_is_refused() {
        let parse = |args: &[&str]| WorkerArgs::parse(args.iter().map(Into::into));
        assert!(matches!(
            parse(&["tcp", "a", "b", "5", "7", "0", "1", "h", "s"]),
            Err(ArgsError::Bad("link"))
        ));
        assert!(matches!(
            parse(&["local", "-3", "4", "5", "7", "0", "1", "h", "s"]),
            Err(ArgsError::Bad("requests fd"))
        ));
    }
}
