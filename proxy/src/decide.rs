//! decide (design §3 step 3): the policy input document built from a classified call, the
//! policy's decision, and what the sidecar does with it. Deny by default: no policy, an
//! evaluation error or an undefined decision all deny, unless the route explicitly fails open
//! (for evaluation errors only). In `audit` mode a deny is logged and counted, not enforced.

use crate::config::PolicyMode;
use crate::record::{CallRecord, Direction};
use crate::reject::Rejection;
use agentmesh_policy::input::{self, Input, CREDENTIAL_HEADERS, INPUT_VERSION};
use agentmesh_policy::{Decision, Policy};
use std::sync::atomic::{AtomicU64, Ordering};

/// JSON-RPC code of a policy deny (implementation-defined server error range).
pub const JSONRPC_POLICY_DENIED: i64 = -32003;

/// The facts about a call that are not in its record.
pub struct CallFacts<'a> {
    pub agent: &'a str,
    pub spiffe_id: Option<&'a str>,
    /// Destination name without its kind (`openai` for `llm/openai`).
    pub destination: &'a str,
    /// The path as the agent sent it, mesh prefix included.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    pub time: String,
}

/// Builds the input documents for a call: one, or one per message of an MCP batch.
pub fn inputs(rec: &CallRecord, facts: &CallFacts) -> Vec<Input> {
    let headers = facts
        .headers
        .iter()
        .filter(|(k, _)| !CREDENTIAL_HEADERS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let base = Input {
        version: INPUT_VERSION,
        direction: match rec.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
        .into(),
        source: input::Source {
            agent: facts.agent.to_string(),
            spiffe_id: facts.spiffe_id.map(str::to_string),
        },
        user: None,
        destination: input::Destination {
            kind: rec.kind.as_str().into(),
            name: facts.destination.to_string(),
        },
        request: input::Request {
            method: rec.method.clone(),
            path: facts.path.to_string(),
            headers,
        },
        llm: rec.llm.as_ref().map(|l| input::Llm {
            provider: l.provider.clone(),
            operation: serde_json::to_value(l.operation)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            model: l.model.clone(),
            stream: l.stream,
            max_tokens: l.max_tokens,
        }),
        mcp: None,
        a2a: rec.a2a.as_ref().map(|a| input::A2a {
            method: a.method.clone(),
            skill: a.skill.clone(),
            task_id: a.task_id.clone(),
            context_id: a.context_id.clone(),
            streaming: a.streaming,
        }),
        budget: None,
        time: facts.time.clone(),
    };
    let Some(m) = rec.mcp.as_ref() else {
        return vec![base];
    };
    let one = |method: Option<&str>, tool: Option<&str>, args: Option<&serde_json::Value>| {
        let mut i = base.clone();
        i.mcp = Some(input::Mcp {
            method: method.map(str::to_string),
            tool: tool.map(str::to_string),
            arguments: args.cloned(),
            session_id: m.session_id.clone(),
            protocol_version: m.protocol_version.clone(),
            batch_size: m.messages.len().max(1),
        });
        i
    };
    if m.messages.is_empty() {
        return vec![one(None, None, None)];
    }
    m.messages
        .iter()
        .map(|x| one(Some(&x.method), x.tool.as_deref(), x.arguments.as_ref()))
        .collect()
}

/// What the sidecar does with a call after policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Forward, adding these headers to the upstream request.
    Allow {
        headers: Vec<(String, String)>,
    },
    Deny(Rejection),
}

/// How one call was decided, for logs and counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The policy's own answer (a deny the sidecar made when there was none).
    pub decision: Decision,
    /// The deny was only logged (audit mode).
    pub audited: bool,
    /// An evaluation error, if the policy failed.
    pub error: Option<String>,
}

/// Decides a call: every input must be allowed.
pub fn decide(
    policy: Option<&Policy>,
    inputs: &[Input],
    mode: PolicyMode,
    fail_open: bool,
    target: &str,
) -> Outcome {
    let mut allowed = Decision {
        allow: true,
        reason: None,
        status: None,
        headers: Vec::new(),
    };
    let mut error = None;
    for input in inputs {
        let d = match policy {
            None => Decision::deny("no policy is loaded: every call is denied"),
            Some(p) => match p.decide(input) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, target, "policy evaluation failed");
                    let msg = e.to_string();
                    error = Some(msg.clone());
                    if fail_open {
                        continue;
                    }
                    Decision::deny(format!("policy evaluation failed: {msg}"))
                }
            },
        };
        if !d.allow {
            let audited = mode == PolicyMode::Audit;
            let reason = d
                .reason
                .clone()
                .unwrap_or_else(|| "denied by policy".into());
            let rej = Rejection::new(d.deny_status(), "policy_denied", reason)
                .upstream(target)
                .jsonrpc(JSONRPC_POLICY_DENIED);
            let verdict = if audited {
                Verdict::Allow {
                    headers: Vec::new(),
                }
            } else {
                Verdict::Deny(rej)
            };
            return Outcome {
                verdict,
                decision: d,
                audited,
                error,
            };
        }
        for h in d.headers {
            if !allowed.headers.contains(&h) {
                allowed.headers.push(h);
            }
        }
    }
    Outcome {
        verdict: Verdict::Allow {
            headers: allowed.headers.clone(),
        },
        decision: allowed,
        audited: false,
        error,
    }
}

/// Decision counters for `/stats`.
#[derive(Debug, Default)]
pub struct PolicyCounters {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Denies that audit mode let through.
    pub audit_denied: AtomicU64,
    pub errors: AtomicU64,
}

impl PolicyCounters {
    pub fn count(&self, o: &Outcome) {
        let c = match (&o.verdict, o.audited) {
            (_, true) => &self.audit_denied,
            (Verdict::Allow { .. }, false) => &self.allowed,
            (Verdict::Deny(_), false) => &self.denied,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if o.error.is_some() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "allowed": self.allowed.load(Ordering::Relaxed),
            "denied": self.denied.load(Ordering::Relaxed),
            "audit_denied": self.audit_denied.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }
}

/// The current time as RFC 3339 UTC with milliseconds (`input.time`).
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
