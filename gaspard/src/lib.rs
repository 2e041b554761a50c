//! gaspard: a daemon that takes CPU-heavy work off a busy event loop and
//! spreads it over every core.
//!
//! Clients send gaspar's framed requests over TCP; one mio loop
//! ([`daemon`]) drives the clients part (`clients`: connections, sessions,
//! deadlines, outcomes) and the workers part (`workers`: worker processes,
//! the endpoint each is reached through, who holds which request, reload);
//! the metrics endpoint (`scrape`) has a thread of its own. Worker
//! processes ([`worker`]) run a handler plugin (`plugin`).
//! `docs/architecture.md` tells the whole story.
//!
//! The library exists for the `gaspard` executable: only what it needs is
//! public.

mod buffers;
pub mod check;
mod clients;
pub mod config;
pub mod daemon;
mod health;
mod listener;
pub mod logging;
pub mod manual;
mod metrics;
pub mod new_handler;
mod notify;
mod plugin;
pub mod pool;
mod privileges;
mod protocol;
mod scrape;
pub mod worker;
mod workers;
