//! The metrics endpoint (`--metrics ADDR`): one HTTP GET per connection,
//! answered from the daemon's own loop, so scraping needs no thread. It has
//! its own listener, connections and buffer, so a scrape never waits behind
//! client work.

use crate::metrics::{http_response, Metrics, MAX_HTTP_REQUEST};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The metrics listener's token.
pub(crate) const METRICS_LISTENER: Token = Token(3);
/// Metrics scrapes: `SCRAPE_BASE + slab key`.
pub(crate) const SCRAPE_BASE: usize = 1 << 17;
/// The first token above the scrapes'.
pub(crate) const SCRAPE_END: usize = 1 << 18;

/// Scrapes served at once; more wait in the backlog.
const MAX_SCRAPES: usize = 64;
/// A scrape must be over within this long.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

struct Scrape {
    stream: TcpStream,
    request: Vec<u8>,
    response: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

enum Step {
    Wait,
    Done,
}

pub(crate) struct Scrapes {
    registry: Registry,
    listener: TcpListener,
    scrapes: Slab<Scrape>,
    scratch: Vec<u8>,
    metrics: Rc<Metrics>,
}

impl Scrapes {
    /// Serves `metrics` on `listener` from now on.
    pub(crate) fn new(
        mut listener: TcpListener,
        registry: Registry,
        metrics: Rc<Metrics>,
    ) -> io::Result<Scrapes> {
        registry.register(&mut listener, METRICS_LISTENER, Interest::READABLE)?;
        log::info!(
            "serving metrics on http://{}/metrics",
            listener.local_addr()?
        );
        Ok(Scrapes {
            registry,
            listener,
            scrapes: Slab::new(),
            scratch: vec![0; MAX_HTTP_REQUEST],
            metrics,
        })
    }

    pub(crate) fn accept(&mut self) {
        while self.scrapes.len() < MAX_SCRAPES {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if crate::listener::is_resource_exhaustion(&e) {
                        log::warn!("cannot accept a metrics scrape: {e}");
                    }
                    return;
                }
            };
            let entry = self.scrapes.vacant_entry();
            let mut scrape = Scrape {
                stream,
                request: Vec::new(),
                response: None,
                deadline: Instant::now() + SCRAPE_TIMEOUT,
            };
            let token = Token(SCRAPE_BASE + entry.key());
            let interest = Interest::READABLE | Interest::WRITABLE;
            if self
                .registry
                .register(&mut scrape.stream, token, interest)
                .is_ok()
            {
                entry.insert(scrape);
            }
        }
        // At the limit: stop watching the listener until a scrape ends.
        let _ = self.registry.deregister(&mut self.listener);
    }

    pub(crate) fn on_event(&mut self, token: Token) {
        let key = token.0 - SCRAPE_BASE;
        let Some(scrape) = self.scrapes.get_mut(key) else {
            return;
        };
        let metrics = &self.metrics;
        if let Step::Done = step(scrape, &mut self.scratch, || metrics.encode()) {
            self.end(key);
        }
    }

    fn end(&mut self, key: usize) {
        let Some(mut scrape) = self.scrapes.try_remove(key) else {
            return;
        };
        let _ = self.registry.deregister(&mut scrape.stream);
        let _ = scrape.stream.shutdown(std::net::Shutdown::Write);
        if self.scrapes.len() == MAX_SCRAPES - 1 {
            let _ =
                self.registry
                    .register(&mut self.listener, METRICS_LISTENER, Interest::READABLE);
        }
    }

    /// When the oldest scrape runs out of time.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.scrapes.iter().map(|(_, scrape)| scrape.deadline).min()
    }

    /// Ends the scrapes past their deadline.
    pub(crate) fn on_timers(&mut self, now: Instant) {
        let overdue: Vec<usize> = self
            .scrapes
            .iter()
            .filter(|(_, scrape)| scrape.deadline <= now)
            .map(|(key, _)| key)
            .collect();
        for key in overdue {
            self.end(key);
        }
    }
}

/// Reads the request head, then writes the response.
fn step(scrape: &mut Scrape, scratch: &mut [u8], metrics: impl FnOnce() -> String) -> Step {
    if scrape.response.is_none() {
        loop {
            match scrape.stream.read(scratch) {
                Ok(0) => return Step::Done,
                Ok(n) => {
                    scrape.request.extend_from_slice(&scratch[..n]);
                    if scrape.request.len() > MAX_HTTP_REQUEST {
                        return Step::Done;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Step::Done,
            }
        }
        match http_response(&scrape.request, metrics) {
            Some(response) => scrape.response = Some((response, 0)),
            None => return Step::Wait,
        }
    }
    let Some((response, written)) = scrape.response.as_mut() else {
        return Step::Wait;
    };
    while *written < response.len() {
        match scrape.stream.write(&response[*written..]) {
            Ok(0) => return Step::Done,
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Step::Done,
        }
    }
    Step::Done
}
