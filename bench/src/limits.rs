//! The open-file limit: every connection is a file descriptor, and a soft
//! limit of 1024 (a common default) would turn `-c 2000` into errors.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors kept for everything that is not a connection.
const SPARE: u64 = 64;

/// Raises the soft open-file limit toward `connections` (plus spares), up to
/// the hard limit, as gaspard does for itself. Returns the limit in force.
pub fn raise_open_files(connections: u64) -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return u64::MAX;
    };
    let wanted = connections.saturating_add(SPARE).min(hard);
    if wanted > soft && setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
        return wanted;
    }
    soft
}
