//! Whether gaspard should be sent work, for a load balancer's health check
//! (`GET /healthz` on the `--metrics` listener). The loop is its one owner:
//! `Daemon::publish_health` computes it from the loop's phase and the
//! workers' readiness at the end of every turn and stores it here; the
//! metrics thread only reads it, so a health check never reaches the loop,
//! a worker or the handler.

use std::sync::atomic::{AtomicU8, Ordering};

/// What `/healthz` says. Only [`Health::Ok`] is 200; every other is 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Health {
    /// The first workers are loading the handler; the port is not served.
    Starting = 0,
    /// Serving, and at least one worker is ready.
    Ok = 1,
    /// Serving, but no worker is ready at this moment (restarting after a
    /// crash or --max-requests): requests wait in the queue.
    Restarting = 2,
    /// Every worker slot keeps failing (`Supervisor::all_failing`): new
    /// requests are refused until a worker comes up again.
    Failing = 3,
    /// A graceful stop has begun (SIGTERM or SIGINT): during --drain-delay
    /// it still accepts, after it only finishes what it holds.
    Draining = 4,
    /// Stopping now (a second signal during the drain, or a signal or a
    /// fatal error before serving).
    Stopping = 5,
}

impl Health {
    const ALL: [Health; 6] = [
        Health::Starting,
        Health::Ok,
        Health::Restarting,
        Health::Failing,
        Health::Draining,
        Health::Stopping,
    ];

    /// The HTTP status line's code and reason.
    pub(crate) fn status(self) -> &'static str {
        match self {
            Health::Ok => "200 OK",
            _ => "503 Service Unavailable",
        }
    }

    /// The body: one word and a newline.
    pub(crate) fn body(self) -> &'static str {
        match self {
            Health::Starting => "starting\n",
            Health::Ok => "ok\n",
            Health::Restarting => "restarting\n",
            Health::Failing => "failing\n",
            Health::Draining => "draining\n",
            Health::Stopping => "stopping\n",
        }
    }
}

/// The last [`Health`] the loop published, shared with the metrics thread.
#[derive(Debug)]
pub(crate) struct Published(AtomicU8);

impl Default for Published {
    fn default() -> Published {
        Published(AtomicU8::new(Health::Starting as u8))
    }
}

impl Published {
    /// Called by the loop alone.
    pub(crate) fn set(&self, health: Health) {
        self.0.store(health as u8, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Health {
        let value = self.0.load(Ordering::Relaxed);
        Health::ALL
            .into_iter()
            .find(|health| *health as u8 == value)
            .unwrap_or(Health::Stopping)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ok_is_200_and_every_value_reads_back() {
        let published = Published::default();
        assert_eq!(published.get(), Health::Starting);
        for health in Health::ALL {
            published.set(health);
            assert_eq!(published.get(), health);
            assert_eq!(health.status().starts_with("200"), health == Health::Ok);
            assert!(health.body().ends_with('\n'));
        }
    }
}
