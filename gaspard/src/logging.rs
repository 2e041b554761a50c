//! Logging setup: `--log-level`, else `RUST_LOG`, else `info`. One line per
//! event, colours only on a terminal, so the output suits journald.

use std::io::IsTerminal;

/// How the daemon hands its log filter to the workers it starts.
pub const FILTER_ENV: &str = "GASPARD_WORKER_LOG";

/// Initialises logging; returns the filter in effect, for the workers.
pub fn init(level: Option<log::LevelFilter>) -> String {
    let filter = match level {
        Some(level) => level.to_string().to_lowercase(),
        None => std::env::var("RUST_LOG")
            .ok()
            .filter(|f| !f.trim().is_empty())
            .unwrap_or_else(|| "info".to_string()),
    };
    init_with(&filter);
    filter
}

/// Initialises a worker's logging from the daemon's filter.
pub fn init_worker() {
    let filter = std::env::var(FILTER_ENV).unwrap_or_else(|_| "info".to_string());
    init_with(&filter);
}

fn init_with(filter: &str) {
    let style = if std::io::stderr().is_terminal() {
        env_logger::WriteStyle::Auto
    } else {
        env_logger::WriteStyle::Never
    };
    env_logger::Builder::new()
        .parse_filters(filter)
        .write_style(style)
        .format_target(false)
        .init();
}
