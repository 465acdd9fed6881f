//! A tiny logger to stderr, which for PID 1 is the console: `hearth-agent: <level>: <text>`.
//! Info and above by default; debug with `HEARTH_AGENT_LOG=debug` or `hearth.debug` on the
//! kernel command line.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

#[derive(Debug)]
struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_ascii_lowercase();
            // Never panic on a broken console (eprintln! would): PID 1 must not die of it.
            let _ = writeln!(
                std::io::stderr().lock(),
                "hearth-agent: {level}: {}",
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger.
pub fn init() {
    let level = match std::env::var("HEARTH_AGENT_LOG").as_deref() {
        Ok("debug") => LevelFilter::Debug,
        Ok("trace") => LevelFilter::Trace,
        Ok("warn") => LevelFilter::Warn,
        Ok("error") => LevelFilter::Error,
        _ => LevelFilter::Info,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
