//! The control protocol that `agentmesh-control` and the sidecar share (design §5): the
//! discovery service and its resource types, generated from `proto/` at build time.

/// Generated messages, client and server of `agentmesh.discovery.v1`.
#[allow(clippy::all, missing_docs)]
pub mod discovery {
    tonic::include_proto!("agentmesh.discovery.v1");
}

/// The one type URL of the aggregated stream: every resource is an `agentmesh.discovery.v1.Resource`.
pub const TYPE_URL: &str = "type.agentmesh.dev/agentmesh.discovery.v1.Resource";

pub mod file_error;
pub mod upstream;

pub use file_error::{from_yaml, FileError};

/// Writes a file whole, readable by its owner only when `private`: to a temporary name beside
/// it, synced, then renamed over the old one, so that a crash leaves the old file or the new,
/// never half of one. Used for persisted config, registrations and keys.
pub fn write_atomically_with(
    path: &std::path::Path,
    bytes: &[u8],
    private: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `write_atomically_with`, for files anyone may read.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_with(path, bytes, false)
}

/// RFC 3339 UTC time, to the millisecond, from unix milliseconds (`2026-11-18T11:06:40.007Z`):
/// the decision log's and the A2A tasks' timestamps.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Written digit by digit: `format!` cost the sidecar 3.7k instructions per call (this is
    // `input.time`), a tenth of all its own work on a call.
    let mut out = String::with_capacity(24);
    for (n, width, end) in [
        (year as u64, 4, '-'),
        (month as u64, 2, '-'),
        (day as u64, 2, 'T'),
        (rem as u64 / 3600, 2, ':'),
        (rem as u64 % 3600 / 60, 2, ':'),
        (rem as u64 % 60, 2, '.'),
        (unix_ms % 1000, 3, 'Z'),
    ] {
        push_padded(&mut out, n, width);
        out.push(end);
    }
    out
}

/// Appends `n` in decimal, zero-padded to at least `width` digits.
fn push_padded(out: &mut String, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[start.min(digits.len() - width)..] {
        out.push(char::from(d));
    }
}

pub mod identity;
pub mod jwt;
pub mod verify;

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_ms_is_utc_to_the_millisecond() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_795_000_000_007, "2026-11-18T11:06:40.007Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_764_583_261_042, "2025-12-01T10:01:01.042Z"),
            (1_000_000_000_999, "2001-09-09T01:46:40.999Z"),
            // Past year 9999 the year takes the digits it needs.
            (253_402_300_800_000, "10000-01-01T00:00:00.000Z"),
        ] {
            assert_eq!(super::rfc3339_ms(ms), text);
        }
    }
}
