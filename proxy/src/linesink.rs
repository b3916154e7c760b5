//! A line writer that never blocks its callers: lines are handed to a dedicated thread over a
//! bounded queue, so a slow disk or a blocked stdout never stalls the proxy's workers. The thread
//! batches whatever is queued and flushes when the queue runs dry. If the queue is full the line
//! is counted as dropped (`/stats`) and a warning logged, never waited for. The access log and
//! the decision log each write through one.

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

impl LineSink {
    /// `spec` is `stdout`, `off`, or a file path (appended to); `name` names the writer thread
    /// and the warnings.
    pub fn open(spec: &str, name: &'static str) -> std::io::Result<LineSink> {
        let sink: Option<Box<dyn Write + Send>> = match spec {
            "off" => None,
            "stdout" | "-" => Some(Box::new(std::io::stdout())),
            path => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
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
                        crate::background::lower_this_thread();
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
