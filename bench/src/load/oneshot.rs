//! A virtual client that does what gaspar clients do: for each request,
//! connect, send the framed request, read the reply until the server closes,
//! close. Latency runs from the connect to that close.

use super::{drained, readable, Client, Ctx, ErrorKind, Plan};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

/// Requests a client may start in a row when each fails at once (nothing
/// listens, no ephemeral port is free), before it lets its thread's other
/// clients run and waits for the next sweep.
const RESTARTS_IN_A_ROW: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// About to start the next request.
    Idle,
    /// Waiting for the next sweep before starting again.
    Backoff,
    /// Connecting (a write then says "would block") or sending.
    Sending,
    /// Reading the reply until the server closes.
    Receiving,
    /// No more requests in this run.
    Done,
}

pub(super) struct OneShot {
    token: Token,
    frame: Arc<[u8]>,
    expected: Option<Arc<[u8]>>,
    phase: Phase,
    stream: Option<TcpStream>,
    started: Instant,
    measured: bool,
    sent: usize,
    received: usize,
    /// Whether the reply so far matches `expected`.
    matches: bool,
}

impl Client for OneShot {
    fn new(token: Token, plan: &Plan) -> OneShot {
        OneShot {
            token,
            frame: plan.frame.clone(),
            expected: plan.expected.clone(),
            phase: Phase::Idle,
            stream: None,
            started: Instant::now(),
            measured: false,
            sent: 0,
            received: 0,
            matches: true,
        }
    }

    fn start(&mut self, ctx: &mut Ctx) {
        if self.phase == Phase::Backoff {
            self.phase = Phase::Idle;
        }
        self.next(ctx);
    }

    fn ready(&mut self, ctx: &mut Ctx, event: &Event, scratch: &mut [u8]) {
        match self.phase {
            // While connecting, a write says "would block"; so any event may
            // be the connection completing (or failing).
            Phase::Sending => self.send(ctx),
            Phase::Receiving if readable(event) => self.receive(ctx, event, scratch),
            _ => {}
        }
        self.next(ctx);
    }

    fn sweep(&mut self, ctx: &mut Ctx, now: Instant) {
        match self.phase {
            Phase::Backoff => self.start(ctx),
            Phase::Sending | Phase::Receiving if now - self.started >= ctx.plan.timeout => {
                self.fail(ctx, ErrorKind::Timeout, &"no whole reply within --timeout");
                self.next(ctx);
            }
            _ => {}
        }
    }

    fn finished(&self) -> bool {
        self.phase == Phase::Done
    }
}

impl OneShot {
    /// Starts requests while the client is idle: a request that fails at
    /// once (connection refused) leaves it idle again.
    fn next(&mut self, ctx: &mut Ctx) {
        for _ in 0..RESTARTS_IN_A_ROW {
            if self.phase != Phase::Idle {
                return;
            }
            self.begin(ctx);
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Backoff;
        }
    }

    fn begin(&mut self, ctx: &mut Ctx) {
        let now = Instant::now();
        let Some(measured) = ctx.ticket(now) else {
            self.phase = Phase::Done;
            return;
        };
        self.started = now;
        self.measured = measured;
        self.sent = 0;
        self.received = 0;
        self.matches = true;
        let connected = TcpStream::connect(ctx.plan.addr).and_then(|mut stream| {
            ctx.registry.register(
                &mut stream,
                self.token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match connected {
            Ok(stream) => {
                self.stream = Some(stream);
                self.phase = Phase::Sending;
                // On loopback the connection is usually up by now: sending
                // at once saves a trip through the poll.
                self.send(ctx);
            }
            Err(error) => self.fail(ctx, ErrorKind::of_io(&error), &error),
        }
    }

    fn send(&mut self, ctx: &mut Ctx) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        while self.sent < self.frame.len() {
            match stream.write(&self.frame[self.sent..]) {
                Ok(0) => {
                    let error = io::Error::from(io::ErrorKind::WriteZero);
                    return self.fail(ctx, ErrorKind::Other, &error);
                }
                Ok(n) => self.sent += n,
                // Still connecting, or the send buffer is full.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return self.fail(ctx, ErrorKind::of_io(&error), &error),
            }
        }
        self.phase = Phase::Receiving;
    }

    fn receive(&mut self, ctx: &mut Ctx, event: &Event, scratch: &mut [u8]) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        loop {
            match stream.read(scratch) {
                Ok(0) => return self.finish(ctx),
                Ok(n) => {
                    if let (Some(expected), true) = (&self.expected, self.matches) {
                        self.matches = expected
                            .get(self.received..self.received + n)
                            .is_some_and(|want| want == &scratch[..n]);
                    }
                    self.received += n;
                    if drained(n, scratch.len(), event) {
                        return;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return self.fail(ctx, ErrorKind::of_io(&error), &error),
            }
        }
    }

    /// The server closed cleanly: the reply is complete.
    fn finish(&mut self, ctx: &mut Ctx) {
        let now = Instant::now();
        self.stream = None;
        self.phase = Phase::Idle;
        match &self.expected {
            Some(expected) if !self.matches || self.received != expected.len() => {
                let detail = format!(
                    "the reply ({} bytes) differs from the one expected ({} bytes)",
                    self.received,
                    expected.len()
                );
                ctx.fail(self.measured, now, ErrorKind::WrongReply, &detail);
            }
            _ => ctx.succeed(self.started, self.measured, now, self.received),
        }
    }

    fn fail(&mut self, ctx: &mut Ctx, kind: ErrorKind, detail: &dyn std::fmt::Display) {
        // Dropping the stream closes it (and takes it out of the poll).
        self.stream = None;
        self.phase = Phase::Idle;
        ctx.fail(self.measured, Instant::now(), kind, detail);
    }
}
