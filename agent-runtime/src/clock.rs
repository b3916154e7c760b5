//! The agent's clock. Real time by default; for tests and drills, a file that holds the current
//! time (unix milliseconds) which whoever controls the test moves forward, so that a task that
//! waits "hours" for a human can be tested in seconds. Only timestamps and expiry read it;
//! timeouts of network calls stay on real time.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    /// Reads the time from this file on every use; real time if it is missing or unreadable.
    File(PathBuf),
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        let real = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        };
        match self {
            Clock::System => real(),
            Clock::File(p) => std::fs::read_to_string(p)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or_else(real),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_clock_reads_the_time_it_is_given() {
        let p = std::env::temp_dir().join(format!("am-clock-{}", std::process::id()));
        let c = Clock::File(p.clone());
        let _ = std::fs::remove_file(&p);
        assert!(c.now_ms() > 1_700_000_000_000, "real time when missing");
        std::fs::write(&p, "1000\n").unwrap();
        assert_eq!(c.now_ms(), 1000);
        std::fs::write(&p, "10801000").unwrap();
        assert_eq!(c.now_ms(), 10_801_000);
        let _ = std::fs::remove_file(&p);
    }
}
