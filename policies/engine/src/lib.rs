//! Rego policy for agentmesh (design §4): the input document every call is decided on, the
//! decision a policy yields, loading policies from a directory, and evaluating them with
//! regorus — compiled once per revision and shared by every worker thread, so no call parses
//! or compiles Rego.

pub mod decision;
pub mod engine;
pub mod input;
pub mod load;
pub mod reads;
pub mod rego_value;
pub mod testing;

pub use decision::Decision;
pub use engine::{CacheMode, EngineKind, Policy, DEFAULT_DECISION_PATH};
pub use input::Input;
pub use load::{load, Sources};

/// Why a policy could not be loaded or could not decide.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no .rego file in it")]
    Empty { path: String },
    /// Parse or compile error; the message names file:line:column.
    #[error("{0}")]
    Compile(String),
    #[error("{path}: invalid data document: {message}")]
    Data { path: String, message: String },
    #[error("decision path `{path}`: {message}")]
    DecisionPath { path: String, message: String },
    /// The policy failed while evaluating this input (a runtime error in Rego).
    #[error("evaluation failed: {0}")]
    Eval(String),
    /// The decision rule produced something that is neither a boolean nor a decision object.
    #[error("the decision is not a boolean or an {{allow, reason, status, headers}} object: {0}")]
    BadDecision(String),
}
