//! A minimal `log` backend: one line per record on standard error, stamped with the seconds
//! since the logger started (about when the process did), so phases can be timed from a log.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let since = START.get_or_init(Instant::now).elapsed();
            // Standard error is unbuffered: formatted straight to it, every piece of a line
            // would be a write of its own (about 30 for a line with a few numbers).
            let line = format!(
                "hearth-vmm {:.3} {} {}: {}\n",
                since.as_secs_f64(),
                record.level(),
                record.target(),
                record.args()
            );
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger at `level`.
pub fn init(level: log::LevelFilter) {
    START.get_or_init(Instant::now);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
