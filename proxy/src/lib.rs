//! agentmesh sidecar proxy. Modules follow the request path of design §3:
//! `classify` (what a call is), `decide` (whether policy lets it), `route` (where it goes),
//! `usage` (what it cost), with `proxy`
//! wiring them onto pingora's phases, `state` holding the one config snapshot, `config` its typed
//! model, `reload` feeding it from the file, and `admin`/`accesslog` showing what happens.

pub mod accesslog;
pub mod admin;
pub mod background;
pub mod card;
pub mod classify;
pub mod config;
pub mod cost;
pub mod decide;
pub mod decisionlog;
pub mod exchange;
pub mod identity;
pub mod linesink;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod pushed;
pub mod record;
pub mod reject;
pub mod reload;
pub mod route;
pub mod server;
pub mod spend;
pub mod state;
pub mod tap;
pub mod traces;
pub mod usage;
pub mod xds;

/// End-user and exchanged JWTs: the validator shared with the control server.
pub use agentmesh_control_api::jwt;
