//! The metrics endpoint (`--metrics ADDR`): one HTTP GET per connection,
//! answered from the daemon's own loop, so scraping needs no thread.

use super::{Daemon, METRICS_LISTENER, SCRAPE_BASE};
use crate::metrics::{http_response, MAX_HTTP_REQUEST};
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Scrapes served at once; more wait in the backlog.
const MAX_SCRAPES: usize = 64;
/// A scrape must be over within this long.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Scrape {
    stream: TcpStream,
    request: Vec<u8>,
    response: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

enum Step {
    Wait,
    Done,
}

impl Daemon {
    pub(super) fn accept_scrapes(&mut self) {
        while self.scrapes.len() < MAX_SCRAPES {
            let Some(listener) = self.metrics_listener.as_ref() else {
                return;
            };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if super::clients::is_resource_exhaustion(&e) {
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
            if self
                .poll
                .registry()
                .register(
                    &mut scrape.stream,
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_ok()
            {
                entry.insert(scrape);
            }
        }
        // At the limit: stop watching the listener until a scrape ends.
        if let Some(listener) = self.metrics_listener.as_mut() {
            let _ = self.poll.registry().deregister(listener);
        }
    }

    pub(super) fn on_scrape_event(&mut self, key: usize) {
        let Some(scrape) = self.scrapes.get_mut(key) else {
            return;
        };
        let metrics = &self.metrics;
        let step = step(scrape, &mut self.scratch, || metrics.encode());
        if let Step::Done = step {
            self.end_scrape(key);
        }
    }

    fn end_scrape(&mut self, key: usize) {
        let Some(mut scrape) = self.scrapes.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut scrape.stream);
        let _ = scrape.stream.shutdown(std::net::Shutdown::Write);
        if self.scrapes.len() == MAX_SCRAPES - 1 {
            if let Some(listener) = self.metrics_listener.as_mut() {
                let _ =
                    self.poll
                        .registry()
                        .register(listener, METRICS_LISTENER, Interest::READABLE);
            }
            self.accept_scrapes();
        }
    }

    pub(super) fn sweep_scrapes(&mut self, now: Instant) {
        let overdue: Vec<usize> = self
            .scrapes
            .iter()
            .filter(|(_, scrape)| scrape.deadline <= now)
            .map(|(key, _)| key)
            .collect();
        for key in overdue {
            self.end_scrape(key);
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
