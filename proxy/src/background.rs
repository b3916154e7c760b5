//! The sidecar's background threads (log writers, span export) run at the lowest scheduling
//! priority (`SCHED_IDLE` on Linux): they use the CPU only when no call needs it, so a batch of
//! spans being encoded or a log flush never delays a call. Under full load they fall behind,
//! and their bounded queues drop (and count) rather than the calls waiting.

/// Lowers the calling thread to idle priority; a no-op where the OS has no such class.
#[allow(unsafe_code)] // one FFI call, on the calling thread only
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid parameter; it
        // touches no memory of ours beyond reading `param`.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "could not lower a background thread's priority"
            );
        }
    }
}

/// Lowers the calling thread once, however often it is called from it (for threads that a
/// library creates and only our callbacks run on).
pub fn lower_this_thread_once() {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    LOWERED.with(|l| {
        if !l.replace(true) {
            lower_this_thread();
        }
    });
}
