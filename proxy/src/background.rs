//! Priorities of the sidecar's background threads, so that they never delay a call on a busy
//! CPU. Span export (encoding batches of spans) runs at `SCHED_IDLE`: it uses the CPU only when
//! no call needs it, and under full load its bounded queue drops and counts spans. The access
//! and decision log writers run at nice 10: they yield to calls but keep a share of a saturated
//! CPU, because their lines are records someone may audit.

/// How much a background thread yields to calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Only when the CPU is otherwise idle (Linux `SCHED_IDLE`).
    Idle,
    /// Below calls, still with a share under load (nice 10).
    Low,
}

/// Sets the calling thread's priority; a no-op (logged at debug) where the OS refuses it.
#[allow(unsafe_code)] // two FFI calls, on the calling thread only
pub fn lower_this_thread(p: Priority) {
    #[cfg(target_os = "linux")]
    {
        let rc = match p {
            Priority::Idle => {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid
                // parameter; it reads `param` and touches nothing else of ours.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }
            }
            // SAFETY: setpriority on this thread's own id; no memory is passed.
            Priority::Low => unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10)
            },
        };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "could not lower a background thread's priority"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = p;
}

/// Lowers the calling thread once, however often it is called from it (for threads that a
/// library creates and only our callbacks run on).
pub fn lower_this_thread_once(p: Priority) {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    LOWERED.with(|l| {
        if !l.replace(true) {
            lower_this_thread(p);
        }
    });
}
