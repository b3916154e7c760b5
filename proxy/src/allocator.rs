//! The sidecar's allocator and its options: jemalloc, with its thread cache swept per 4 MiB.
//! A module of the `agentmesh-proxy` binary, and included by `tests/src/bin/pingora-floor.rs`
//! (through `#[path]`) so that the benchmark's bare pingora proxy allocates as the sidecar does.

/// jemalloc, as ztunnel and linkerd2-proxy use: per call, glibc malloc+free cost 89k instructions
/// (5x the bare pingora proxy's) once policy values fragmented its heap (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in options, read before `main` (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them). `tcache_gc_incr_bytes`: the thread cache is swept once per 4 MiB allocated
/// instead of jemalloc's default 64 KiB. pingora allocates a 64 KiB body buffer for every upstream
/// response, so with the default each call swept all of the cache's bins: 8.6k of the 153k
/// instructions of a call (`scripts/callgrind.sh`, BENCHMARKS.md).
// SAFETY (the one `unsafe_code` of the binaries): jemalloc declares `_rjem_malloc_conf` as a weak
// `const char *`; this strong definition is a thin pointer to a NUL-terminated string that lives
// for the whole process, which is all jemalloc reads from it.
#[allow(non_upper_case_globals, unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 29] = b"tcache_gc_incr_bytes:4194304\0";
