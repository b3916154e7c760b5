//! The local agent's LLM spend in the current budget window, fed by each call's cost and read
//! into `input.budget` for policy. Windows are fixed and aligned to the Unix epoch (a `24h`
//! window is the UTC day); the count starts at zero in each new window and on restart.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug)]
pub struct Spend {
    window: Duration,
    /// The window as policy input shows it (`24h`), written once.
    window_text: String,
    /// (window index, USD spent in it)
    state: Mutex<(u64, f64)>,
}

impl Spend {
    pub fn new(window: Duration) -> Spend {
        let window = window.max(Duration::from_secs(1));
        Spend {
            window,
            window_text: window_text(window),
            state: Mutex::new((0, 0.0)),
        }
    }

    /// The window's length as policy input shows it, e.g. `24h`.
    pub fn window_text(&self) -> &str {
        &self.window_text
    }

    fn index_at(&self, now: SystemTime) -> u64 {
        now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / self.window.as_secs()
    }

    pub fn add(&self, usd: f64) {
        self.add_at(usd, SystemTime::now());
    }

    pub fn current(&self) -> f64 {
        self.current_at(SystemTime::now())
    }

    fn add_at(&self, usd: f64, now: SystemTime) {
        let i = self.index_at(now);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 != i {
            *s = (i, 0.0);
        }
        s.1 += usd;
    }

    fn current_at(&self, now: SystemTime) -> f64 {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 == self.index_at(now) {
            s.1
        } else {
            0.0
        }
    }
}

/// A window in the largest whole unit of hours, minutes or seconds, as a config would write it
/// (`24h`, not humantime's `1day`, which docs/policy.md and the policy library's tests use).
fn window_text(window: Duration) -> String {
    let s = window.as_secs();
    match s {
        _ if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spend_adds_up_within_a_window_and_restarts_in_the_next() {
        let s = Spend::new(Duration::from_secs(86_400));
        let day = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400);
        s.add_at(0.25, day + Duration::from_secs(10));
        s.add_at(0.5, day + Duration::from_secs(80_000));
        assert_eq!(s.current_at(day + Duration::from_secs(86_399)), 0.75);
        assert_eq!(s.current_at(day + Duration::from_secs(86_400)), 0.0);
        s.add_at(1.0, day + Duration::from_secs(90_000));
        assert_eq!(s.current_at(day + Duration::from_secs(90_001)), 1.0);
    }

    #[test]
    fn the_window_reads_as_a_config_writes_it() {
        for (secs, text) in [(86_400, "24h"), (3_600, "1h"), (5_400, "90m"), (90, "90s")] {
            assert_eq!(Spend::new(Duration::from_secs(secs)).window_text(), text);
        }
    }
}
