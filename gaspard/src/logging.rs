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
    let mut builder = env_logger::Builder::new();
    builder
        .parse_filters(filter)
        .write_style(style)
        .format_target(false);
    // Under systemd, journald stamps each line itself and reads the level
    // from a syslog priority prefix.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|out, record| {
            use std::io::Write;
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(out, "<{priority}>{}", record.args())
        });
    }
    builder.init();
}

/// Keeps a flood of similar warnings (one per refused client under
/// overload, say) to one line a second, with a count of those held back.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<std::time::Instant>,
    held_back: u64,
}

impl Throttle {
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

    pub fn warn(&mut self, now: std::time::Instant, message: std::fmt::Arguments<'_>) {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Self::WINDOW)
        {
            self.held_back += 1;
            return;
        }
        match std::mem::take(&mut self.held_back) {
            0 => log::warn!("{message}"),
            n => log::warn!("{message} ({n} similar held back since the last such line)"),
        }
        self.last = Some(now);
    }

    /// When [`Self::flush`] has a count to report.
    pub fn next_flush(&self) -> Option<std::time::Instant> {
        let last = self.last?;
        (self.held_back > 0).then_some(last + Self::WINDOW)
    }

    /// Reports the lines held back, once their window has passed.
    pub fn flush(&mut self, now: std::time::Instant) {
        if self.next_flush().is_some_and(|at| now >= at) {
            let n = std::mem::take(&mut self.held_back);
            log::warn!("{n} similar lines held back in the last second");
        }
    }
}
