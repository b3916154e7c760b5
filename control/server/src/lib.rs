//! `agentmesh-control`: the mesh's control server (design §5). A config source (a watched YAML
//! directory by default) declares agents, upstreams, policies and secrets; the discovery service
//! (gRPC, 15010) pushes each sidecar exactly what its agent is granted and records its ACKs and
//! NACKs; the registry API (HTTPS JSON, 15012) finds agents by name, skill, owner or tag.

pub mod ads;
pub mod api;
pub mod authority;
pub mod ca_api;
pub mod control;
pub mod model;
pub mod registry;
pub mod resources;
pub mod serve;
pub mod source;
pub mod tls;
pub mod tokens;
pub mod xds_listener;
