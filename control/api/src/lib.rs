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
