//! The metrics endpoint (`--metrics ADDR`): a thread of its own, so that a
//! scrape never waits behind client work in the loop, and client work never
//! waits behind a scrape. It serves `/metrics` and the health check
//! `/healthz` (from what the loop published, see `crate::health`), one
//! HTTP GET or HEAD per connection, each within [`SCRAPE_TIMEOUT`]. Each
//! connection gets a short-lived thread of its own, up to [`MAX_SCRAPES`]
//! at once: a client that connects and stalls must not hold up the load
//! balancer's health checks behind it.

use crate::health::Published;
use crate::metrics::{http_response, Metrics, MAX_HTTP_REQUEST};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A scrape must be over within this long.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections answered at once; past it, a new one is closed unanswered
/// (a monitoring system retries; a flood gets no more threads).
const MAX_SCRAPES: usize = 16;
/// How long accept waits after running out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves `metrics` and `health` on `listener` from now on, until the
/// process ends. Both are only read here.
pub(crate) fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Published>,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    log::info!("serving metrics on http://{addr}/metrics");
    log::info!("serving health checks on http://{addr}/healthz");
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if active.fetch_add(1, Ordering::Relaxed) >= MAX_SCRAPES {
                        active.fetch_sub(1, Ordering::Relaxed);
                        continue; // dropped: closed unanswered
                    }
                    let shared = (Arc::clone(&metrics), Arc::clone(&health));
                    let done = Arc::clone(&active);
                    let spawned =
                        std::thread::Builder::new()
                            .name("scrape".into())
                            .spawn(move || {
                                if let Err(e) = answer(stream, &shared.0, &shared.1) {
                                    log::debug!("metrics scrape: {e}");
                                }
                                done.fetch_sub(1, Ordering::Relaxed);
                            });
                    if let Err(e) = spawned {
                        log::warn!("cannot answer a metrics scrape: {e}");
                        active.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("cannot accept a metrics scrape: {e}");
                    std::thread::sleep(ACCEPT_PAUSE);
                }
            }
        })?;
    Ok(())
}

/// Reads the request head, then writes the response, all within
/// [`SCRAPE_TIMEOUT`].
fn answer(mut stream: TcpStream, metrics: &Metrics, health: &Published) -> io::Result<()> {
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    let mut request = Vec::new();
    let mut buf = [0; 1024];
    let response = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
        if request.len() > MAX_HTTP_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
        if let Some(response) = http_response(&request, || metrics.encode(), || health.get()) {
            break response;
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
    stream.write_all(&response)?;
    // A health checker often closes as soon as it has the status line:
    // nothing is lost if the socket is gone already.
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}
