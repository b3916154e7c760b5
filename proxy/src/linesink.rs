//! A line writer that never blocks its callers: lines are handed to a dedicated thread over a
//! bounded queue, so a slow disk or a blocked stdout never stalls the proxy's workers. The thread
//! batches whatever is queued and flushes when the queue runs dry. If the queue is full the line
//! is counted as dropped (`/stats`) and a warning logged, never waited for. The access log and
//! the decision log each write through one. A file sink is rotated by size (`FILE` → `FILE.1` →
//! ... → `FILE.N`, the oldest removed), between batches, so no line is split across files.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE_LINES: usize = 65_536;

/// What happened to the lines, for `/stats`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Counters {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
}

pub struct LineSink {
    tx: Option<SyncSender<Vec<u8>>>,
    name: &'static str,
    counters: Arc<Counters>,
}

/// When a log file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the file is at least this big (0: never).
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` is the newest).
    pub keep: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_bytes: 100 * 1024 * 1024,
            keep: 5,
        }
    }
}

/// A log file that moves itself aside when it grows past its size.
struct RotatingFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    size: u64,
    rotation: Rotation,
}

impl RotatingFile {
    fn open(path: &std::path::Path, rotation: Rotation) -> std::io::Result<RotatingFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            size,
            rotation,
        })
    }

    fn numbered(&self, n: usize) -> std::path::PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let keep = self.rotation.keep;
        if keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(self.numbered(keep));
        for n in (1..keep).rev() {
            let from = self.numbered(n);
            if from.exists() {
                std::fs::rename(&from, self.numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.numbered(1))?;
        *self = RotatingFile::open(&self.path, self.rotation)?;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    /// Called by the writer thread after each batch of whole lines: the place to rotate.
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        if self.rotation.max_bytes > 0 && self.size >= self.rotation.max_bytes {
            if let Err(e) = self.rotate() {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot rotate a log file");
                return Err(e);
            }
        }
        Ok(())
    }
}

impl LineSink {
    /// `spec` is `stdout`, `off`, or a file path (appended to, rotated by `rotation`); `name`
    /// names the writer thread and the warnings.
    pub fn open(spec: &str, name: &'static str, rotation: Rotation) -> std::io::Result<LineSink> {
        let sink: Option<Box<dyn Write + Send>> = match spec {
            "off" => None,
            "stdout" | "-" => Some(Box::new(std::io::stdout())),
            path => Some(Box::new(RotatingFile::open(
                std::path::Path::new(path),
                rotation,
            )?)),
        };
        Self::with_writer(sink, name, QUEUE_LINES)
    }

    pub(crate) fn with_writer(
        sink: Option<Box<dyn Write + Send>>,
        name: &'static str,
        queue: usize,
    ) -> std::io::Result<LineSink> {
        let counters = Arc::new(Counters::default());
        let tx = match sink {
            None => None,
            Some(sink) => {
                let (tx, rx) = sync_channel::<Vec<u8>>(queue);
                let c = counters.clone();
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        crate::background::lower_this_thread(crate::background::Priority::Low);
                        let mut out = std::io::BufWriter::with_capacity(64 * 1024, sink);
                        // Blocks for the next line, takes every other queued one, then flushes.
                        while let Ok(first) = rx.recv() {
                            let mut n = 0u64;
                            let mut ok = out.write_all(&first).is_ok();
                            n += 1;
                            while let Ok(line) = rx.try_recv() {
                                ok &= out.write_all(&line).is_ok();
                                n += 1;
                            }
                            ok &= out.flush().is_ok();
                            if ok {
                                c.written.fetch_add(n, Ordering::Relaxed);
                            } else {
                                c.write_errors.fetch_add(n, Ordering::Relaxed);
                            }
                        }
                    })?;
                Some(tx)
            }
        };
        Ok(LineSink { tx, name, counters })
    }

    /// Whether lines go anywhere (callers skip rendering when not).
    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Queues one line (with its newline).
    pub fn send(&self, line: Vec<u8>) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_multiple_of(10_000) {
                    tracing::warn!(
                        log = self.name,
                        dropped = n + 1,
                        "log writer is behind; lines dropped"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    /// A sink tests can read back, optionally stalled until released.
    #[derive(Clone, Default)]
    pub(crate) struct Shared(
        pub Arc<std::sync::Mutex<Vec<u8>>>,
        pub Arc<std::sync::Mutex<()>>,
    );

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _gate = self.1.lock().unwrap();
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub(crate) fn wait_for(c: &AtomicU64, n: u64) {
        for _ in 0..500 {
            if c.load(Ordering::Relaxed) >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn files_rotate_by_size_between_lines_and_keep_the_newest() {
        let dir = std::env::temp_dir().join(format!("agentmesh-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.jsonl");
        let rotation = Rotation {
            max_bytes: 100,
            keep: 2,
        };
        let log = LineSink::open(path.to_str().unwrap(), "test", rotation).unwrap();
        // 45 lines of 10 bytes, sent one at a time so that batches are small.
        for i in 0..45 {
            log.send(format!("line {i:04}\n").into_bytes());
            wait_for(&log.counters().written, i + 1);
        }
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        let (now, one, two) = (
            read(&path),
            read(&dir.join("access.jsonl.1")),
            read(&dir.join("access.jsonl.2")),
        );
        assert!(
            !dir.join("access.jsonl.3").exists(),
            "only 2 rotated files kept"
        );
        for f in [&one, &two] {
            assert!(
                f.len() >= 100 && f.len() < 200,
                "rotated near the size: {}",
                f.len()
            );
            assert!(
                f.ends_with('\n') && f.lines().all(|l| l.len() == 9),
                "whole lines: {f:?}"
            );
        }
        // The newest lines are in the live file, the ones before in .1, then .2.
        assert!(now.ends_with("line 0044\n"), "{now:?}");
        let last_of = |f: &str| f.lines().last().unwrap()[5..].parse::<u32>().unwrap();
        let first_of = |f: &str| f.lines().next().unwrap()[5..].parse::<u32>().unwrap();
        assert_eq!(last_of(&two) + 1, first_of(&one));
        assert_eq!(last_of(&one) + 1, first_of(&now));
        assert_eq!(log.counters().write_errors.load(Ordering::Relaxed), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_instead_of_blocking() {
        let sink = Shared::default();
        let gate = sink.1.lock().unwrap(); // the sink blocks until released
        let log = LineSink::with_writer(Some(Box::new(sink.clone())), "test", 4).unwrap();
        // The first line reaches the writer thread, which then stalls on the sink.
        log.send(b"0\n".to_vec());
        std::thread::sleep(Duration::from_millis(100));
        for i in 1..50 {
            log.send(format!("{i}\n").into_bytes());
        }
        // The caller was never blocked: 49 more lines returned with the sink stalled; the
        // queue kept 4 of them and counted the rest as dropped.
        assert_eq!(log.counters().dropped.load(Ordering::Relaxed), 45);
        drop(gate);
        wait_for(&log.counters().written, 5);
        assert_eq!(log.counters().written.load(Ordering::Relaxed), 5);
        assert_eq!(
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(),
            "0\n1\n2\n3\n4\n"
        );
    }
}
