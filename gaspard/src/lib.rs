//! gaspard: a daemon that takes CPU-heavy work off a busy event loop and
//! spreads it over every core.
//!
//! Clients send gaspar's framed requests over TCP; one mio loop
//! ([`daemon`]) reads them ([`connection`], [`protocol`]), queues them
//! ([`dispatcher`]) and hands them over links ([`link`]: a socket pair and
//! a pipe each) to worker processes ([`supervisor`], [`worker`]) that run a
//! handler plugin ([`plugin`]).
//! `docs/architecture.md` tells the whole story.

pub mod check;
pub mod claims;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod dispatcher;
pub mod link;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod plugin;
pub mod privileges;
pub mod protocol;
pub mod session;
pub mod supervisor;
pub mod worker;
