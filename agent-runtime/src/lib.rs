//! agentmesh agent runtime crate. Today it holds the deterministic fixtures that stand in for
//! paid external services in tests and the demo: `mock_llm` (OpenAI/Anthropic-compatible) and
//! `mcp_server` (a sample MCP tool server), served by `serve`; and the first part of the agent
//! runtime itself (`agentmesh-agent`): `manifest` (what an agent is), `store` (durable task
//! state), `runner` (model-planned loop and workflows), `a2a` (the protocol's shapes and client),
//! `agent` (the A2A server) and `clock`.

pub mod a2a;
pub mod agent;
pub mod clock;
pub mod manifest;
pub mod mcp_server;
pub mod mock_llm;
pub mod runner;
pub mod serve;
pub mod store;

/// A response's content type, or empty.
pub(crate) fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}
