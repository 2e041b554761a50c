//! End-to-end tests: the real `gaspard` binary, real handler plugins, real
//! TCP on 127.0.0.1. One module per area.

mod allow;
mod areas;
mod authors;
mod chaos;
mod check;
mod clients;
mod documented;
mod failures;
mod haproxy;
mod health;
mod killed;
mod lifecycle;
mod limits;
mod memory;
mod operations;
mod package;
mod persistent;
mod pool;
mod pool_host;
mod python;
mod round_trip;
mod shell;
mod workers;
mod zmq;
