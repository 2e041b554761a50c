//! The CPU time this process has used, so that a report can say whether the
//! generator competed with the server it measures.

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeValLike;
use std::time::Duration;

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// The time used between `earlier` and this reading.
    pub fn since(&self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    /// As a percentage of one core over `wall`.
    pub fn percent_of_one_core(&self, wall: Duration) -> f64 {
        if wall.is_zero() {
            return 0.0;
        }
        self.total().as_secs_f64() / wall.as_secs_f64() * 100.0
    }
}

/// The CPU time every thread of this process has used so far
/// (getrusage(RUSAGE_SELF)); zero in the unlikely case the call fails.
pub fn used() -> CpuTime {
    let micros = |tv: nix::sys::time::TimeVal| {
        Duration::from_micros(u64::try_from(tv.num_microseconds()).unwrap_or(0))
    };
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|usage| CpuTime {
            user: micros(usage.user_time()),
            system: micros(usage.system_time()),
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinning_shows_up_as_user_time() {
        let before = used();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        // Spin until the kernel has charged some CPU time (bounded, so that
        // a broken getrusage fails rather than hangs).
        while used().since(before).user < Duration::from_millis(20)
            && start.elapsed() < Duration::from_secs(10)
        {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let spent = used().since(before);
        assert!(spent.user >= Duration::from_millis(20), "{spent:?}");
        assert!(spent.percent_of_one_core(start.elapsed()) > 0.0);
        assert_eq!(spent.percent_of_one_core(Duration::ZERO), 0.0);
    }
}
