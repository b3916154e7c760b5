// agentmesh patch 5: the keep-alive pool of upstream connections (see PATCHES.md).
//
// Licensed under the Apache License, Version 2.0 (the "License"), as the rest of this crate.

//! The keep-alive pool of idle upstream connections: a list per peer, and one sweeper per pool.
//!
//! pingora's pool spawned a task per released connection to watch it while idle, and handed the
//! connection back through that task (a oneshot, a mutex and two wake-ups) on every reuse. Here
//! an idle connection is only stored: taking one back is a pop under a short lock, and whether it
//! is still good (not closed by the peer, no stray bytes, not past its idle timeout) is checked
//! then, by the caller. A sweeper task, one per pool, wakes every [`SWEEP_EVERY`] to close the
//! connections that timed out or that the peer closed, so that none lingers long unused.
//!
//! Connections are reused last in, first out: the warmest connection serves the next call, and
//! connections left over after a burst go idle and time out. When the pool is full, the
//! connection idle the longest, of any peer, is closed to make room.

use super::{test_reusable_stream, PoolCallback};
use crate::protocols::Stream;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often the sweeper looks for connections to close.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One idle connection.
struct Idle {
    stream: Stream,
    since: Instant,
    timeout: Option<Duration>,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.timeout
            .is_some_and(|t| now.saturating_duration_since(self.since) >= t)
    }
}

#[derive(Default)]
struct Lists {
    /// Oldest at the front, most recently released at the back. A list emptied by reuse stays
    /// until the next sweep.
    by_key: HashMap<u64, VecDeque<Idle>>,
    count: usize,
    sweeper_started: bool,
}

/// The idle connections of one connector.
pub(crate) struct IdlePool {
    lists: Mutex<Lists>,
    size: usize,
    /// Told how long a connection was idle when it is closed to make room.
    on_evict: Option<PoolCallback>,
    /// Counts the idle connections closed because bytes arrived on them.
    unexpected_data: Arc<AtomicU64>,
}

impl IdlePool {
    pub(crate) fn new(
        size: usize,
        on_evict: Option<PoolCallback>,
        unexpected_data: Arc<AtomicU64>,
    ) -> Arc<Self> {
        Arc::new(IdlePool {
            lists: Mutex::new(Lists::default()),
            size,
            on_evict,
            unexpected_data,
        })
    }

    /// Stores `stream` as idle under `key`; it may be taken back until `timeout` has passed.
    pub(crate) fn put(self: &Arc<Self>, key: u64, stream: Stream, timeout: Option<Duration>) {
        if self.size == 0 {
            return;
        }
        let idle = Idle {
            stream,
            since: Instant::now(),
            timeout,
        };
        let (evicted, start_sweeper) = {
            let mut lists = self.lists.lock();
            let evicted = if lists.count >= self.size {
                lists.pop_oldest()
            } else {
                None
            };
            lists.by_key.entry(key).or_default().push_back(idle);
            lists.count += 1;
            let start = !lists.sweeper_started;
            lists.sweeper_started = true;
            (evicted, start)
        };
        // Closed outside the lock.
        if let Some(old) = evicted {
            if let Some(callback) = &self.on_evict {
                callback(old.since.elapsed());
            }
        }
        if start_sweeper {
            let pool = Arc::downgrade(self);
            pingora_runtime::current_handle().spawn(sweep(pool));
        }
    }

    /// Takes the most recently released connection under `key`, if any. The caller checks that
    /// it is still good; [`Self::take_fresh`] does the idle-timeout part.
    fn take(&self, key: u64) -> Option<Idle> {
        let mut lists = self.lists.lock();
        // An emptied list stays (the sweeper drops it): a peer's one connection goes back and
        // forth without a list being freed and made again on every call.
        let idle = lists.by_key.get_mut(&key)?.pop_back();
        if idle.is_some() {
            lists.count -= 1;
        }
        idle
    }

    /// Takes the most recently released connection under `key` that is within its idle timeout,
    /// closing any past it on the way.
    pub(crate) fn take_fresh(&self, key: u64) -> Option<Stream> {
        let now = Instant::now();
        while let Some(idle) = self.take(key) {
            if !idle.expired(now) {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Closes the connections past their idle timeout, and those the peer closed or sent bytes
    /// on.
    fn sweep_once(&self) {
        let now = Instant::now();
        let mut closed = Vec::new();
        {
            let mut lists = self.lists.lock();
            let mut removed = 0;
            lists.by_key.retain(|_, list| {
                let before = list.len();
                let mut i = 0;
                while i < list.len() {
                    if list[i].expired(now)
                        || !test_reusable_stream(&mut list[i].stream, &self.unexpected_data)
                    {
                        closed.extend(list.remove(i));
                    } else {
                        i += 1;
                    }
                }
                removed += before - list.len();
                !list.is_empty()
            });
            lists.count -= removed;
        }
        drop(closed); // closed outside the lock
    }
}

impl Lists {
    /// Removes the connection idle the longest, of any key.
    fn pop_oldest(&mut self) -> Option<Idle> {
        let key = *self
            .by_key
            .iter()
            .filter_map(|(k, list)| list.front().map(|idle| (k, idle.since)))
            .min_by_key(|(_, since)| *since)?
            .0;
        let idle = self.by_key.get_mut(&key)?.pop_front();
        self.count -= 1;
        idle
    }
}

/// The sweeper of one pool; it ends with the pool.
async fn sweep(pool: Weak<IdlePool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep_once();
    }
}
