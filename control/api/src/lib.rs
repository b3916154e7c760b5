//! The control protocol that `agentmesh-control` and the sidecar share (design §5): the
//! discovery service and its resource types, generated from `proto/` at build time.

/// Generated messages, client and server of `agentmesh.discovery.v1`.
#[allow(clippy::all, missing_docs)]
pub mod discovery {
    tonic::include_proto!("agentmesh.discovery.v1");
}

/// The one type URL of the aggregated stream: every resource is an `agentmesh.discovery.v1.Resource`.
pub const TYPE_URL: &str = "type.agentmesh.dev/agentmesh.discovery.v1.Resource";

pub mod upstream;

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

pub mod identity;
pub mod jwt;
pub mod verify;
