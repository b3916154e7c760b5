//! agentmesh agent runtime crate. Today it holds the deterministic fixtures that stand in for
//! paid external services in tests and the demo: `mock_llm` (OpenAI/Anthropic-compatible) and
//! `mcp_server` (a sample MCP tool server), served by `serve`; and the first part of the agent
//! runtime itself: `manifest` (what an agent is) and `store` (durable task state).

pub mod manifest;
pub mod mcp_server;
pub mod mock_llm;
pub mod runner;
pub mod serve;
pub mod store;
