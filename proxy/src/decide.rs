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
    /// The end user, from a validated JWT.
    pub user: Option<&'a crate::jwt::User>,
    /// Destination name without its kind (`openai` for `llm/openai`).
    pub destination: &'a str,
    /// The path as the agent sent it, mesh prefix included.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    pub time: String,
    /// The source agent's spend in the current window (outbound calls).
    pub budget: Option<input::Budget>,
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
        user: facts.user.map(|u| input::User {
            sub: u.sub.clone(),
            claims: u.claims.clone(),
        }),
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
            operation: l.operation.as_str().to_string(),
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
        budget: facts.budget.clone(),
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
    /// Each evaluation made, in input order (the decision log writes one entry each).
    pub evaluations: Vec<Evaluation>,
}

/// One evaluation of the policy on one input document.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub result: Result<Decision, String>,
    pub eval_ns: u64,
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
    let mut evaluations = Vec::with_capacity(inputs.len());
    for input in inputs {
        let d = match policy {
            None => {
                let msg = "no policy is loaded: every call is denied";
                tracing::error!(target, "{msg}");
                evaluations.push(Evaluation {
                    result: Err(msg.into()),
                    eval_ns: 0,
                });
                Decision::deny(msg)
            }
            Some(p) => {
                let started = std::time::Instant::now();
                let result = p.decide(input).map_err(|e| e.to_string());
                evaluations.push(Evaluation {
                    result: result.clone(),
                    eval_ns: started.elapsed().as_nanos() as u64,
                });
                match result {
                    Ok(d) => d,
                    Err(msg) => {
                        tracing::error!(error = %msg, target, "policy evaluation failed");
                        error = Some(msg.clone());
                        if fail_open {
                            continue;
                        }
                        Decision::deny(format!("policy evaluation failed: {msg}"))
                    }
                }
            }
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
                evaluations,
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
        evaluations,
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

impl Outcome {
    /// `allow`, `deny`, or `audit_deny` (a deny that audit mode let through).
    pub fn label(&self) -> &'static str {
        match (&self.verdict, self.audited) {
            (_, true) => "audit_deny",
            (Verdict::Allow { .. }, false) => "allow",
            (Verdict::Deny(_), false) => "deny",
        }
    }
}

impl PolicyCounters {
    pub fn count(&self, o: &Outcome) {
        let c = match o.label() {
            "audit_deny" => &self.audit_denied,
            "allow" => &self.allowed,
            _ => &self.denied,
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
    agentmesh_control_api::rfc3339_ms(now.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{classify, Destination};
    use crate::config::{CallKind, LlmApi};
    use agentmesh_policy::load::Sources;
    use http::HeaderMap;

    fn classified(kind: CallKind, path: &str, headers: &HeaderMap, body: &str) -> CallRecord {
        let mut r = CallRecord::new(Direction::Outbound, kind, "t", "POST", path);
        let llm_api = (kind == CallKind::Llm).then_some(LlmApi::Openai);
        let dest = Destination {
            kind,
            name: "x",
            llm_api,
        };
        classify(&mut r, dest, headers, body.as_bytes()).unwrap();
        r
    }

    fn facts<'a>(headers: &'a HeaderMap, path: &'a str) -> CallFacts<'a> {
        CallFacts {
            agent: "planner",
            spiffe_id: None,
            user: None,
            destination: "x",
            path,
            headers,
            time: "2026-12-01T00:00:00.000Z".into(),
            budget: None,
        }
    }

    fn policy(rego: &str) -> Policy {
        let sources = Sources {
            modules: vec![("p.rego".into(), rego.into())],
            data: serde_json::json!({}),
            revision: "t".into(),
        };
        Policy::compile(
            &sources,
            agentmesh_policy::DEFAULT_DECISION_PATH,
            agentmesh_policy::EngineKind::Interpreter,
        )
        .unwrap()
    }

    #[test]
    fn llm_input_carries_the_model_and_never_credentials() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer sk-secret".parse().unwrap());
        h.insert("x-api-key", "sk-ant-secret".parse().unwrap());
        h.insert("x-team", "search".parse().unwrap());
        let rec = classified(
            CallKind::Llm,
            "/v1/chat/completions",
            &h,
            r#"{"model":"gpt-4o-mini","messages":[],"stream":true}"#,
        );
        let inputs = inputs(&rec, &facts(&h, "/llm/x/v1/chat/completions"));
        assert_eq!(inputs.len(), 1);
        let i = &inputs[0];
        let llm = i.llm.as_ref().unwrap();
        assert_eq!(llm.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(llm.operation, "chat_completions");
        assert!(llm.stream);
        assert_eq!(i.destination.kind, "llm");
        assert_eq!(i.request.path, "/llm/x/v1/chat/completions");
        assert_eq!(
            i.request.headers.get("x-team").map(String::as_str),
            Some("search")
        );
        let text = serde_json::to_string(i).unwrap();
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn an_mcp_batch_gives_one_input_per_message_with_arguments() {
        let h = HeaderMap::new();
        let rec = classified(
            CallKind::Mcp,
            "/",
            &h,
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}},
                {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/shadow"}}}]"#,
        );
        let inputs = inputs(&rec, &facts(&h, "/mcp/x"));
        assert_eq!(inputs.len(), 2);
        let m = inputs[1].mcp.as_ref().unwrap();
        assert_eq!(m.tool.as_deref(), Some("read_file"));
        assert_eq!(m.arguments.as_ref().unwrap()["path"], "/etc/shadow");
        assert_eq!(m.batch_size, 2);
        // One denied message denies the whole batch.
        let p = policy(
            "package agentmesh.authz\nimport rego.v1\ndefault decision := true\ndecision := {\"allow\": false, \"reason\": \"no files\"} if input.mcp.tool == \"read_file\"\n",
        );
        let out = decide(Some(&p), &inputs, PolicyMode::Enforce, false, "mcp/x");
        let Verdict::Deny(rej) = out.verdict else {
            panic!("batch should be denied")
        };
        assert_eq!(rej.status, 403);
        assert_eq!(rej.message, "no files");
        assert_eq!(rej.jsonrpc_code, JSONRPC_POLICY_DENIED);
    }

    #[test]
    fn a2a_input_names_method_and_skill() {
        let h = HeaderMap::new();
        let rec = classified(
            CallKind::A2a,
            "/",
            &h,
            r#"{"jsonrpc":"2.0","id":1,"method":"message/send","params":{"message":{"role":"user","parts":[],"messageId":"m1"},"metadata":{"skill":"summarize"}}}"#,
        );
        let a = inputs(&rec, &facts(&h, "/agents/x"))[0]
            .a2a
            .clone()
            .unwrap();
        assert_eq!(a.method, "message/send");
    }

    #[test]
    fn deny_by_default_and_on_errors_unless_failing_open() {
        let h = HeaderMap::new();
        let rec = classified(CallKind::Http, "/", &h, "");
        let i = inputs(&rec, &facts(&h, "/http/x"));
        let none = decide(None, &i, PolicyMode::Enforce, false, "http/x");
        assert!(matches!(none.verdict, Verdict::Deny(ref r) if r.message.contains("no policy")));
        // Both definitions apply: a conflict found only while evaluating.
        let broken = policy(
            "package agentmesh.authz\ndecision := true if input.version == 1\ndecision := false if input.version == 1\n",
        );
        let closed = decide(Some(&broken), &i, PolicyMode::Enforce, false, "http/x");
        assert!(matches!(closed.verdict, Verdict::Deny(_)));
        assert!(closed.error.is_some());
        let open = decide(Some(&broken), &i, PolicyMode::Enforce, true, "http/x");
        assert!(matches!(open.verdict, Verdict::Allow { .. }));
        assert!(open.error.is_some());
    }

    #[test]
    fn audit_mode_lets_a_deny_through_and_says_so() {
        let h = HeaderMap::new();
        let rec = classified(CallKind::Http, "/", &h, "");
        let i = inputs(&rec, &facts(&h, "/http/x"));
        let p = policy("package agentmesh.authz\ndecision := {\"allow\": false, \"reason\": \"r\", \"status\": 451}\n");
        let enforced = decide(Some(&p), &i, PolicyMode::Enforce, false, "http/x");
        assert!(matches!(enforced.verdict, Verdict::Deny(ref r) if r.status == 451));
        let audited = decide(Some(&p), &i, PolicyMode::Audit, false, "http/x");
        assert!(audited.audited);
        assert!(matches!(audited.verdict, Verdict::Allow { .. }));
        assert!(!audited.decision.allow);
        let c = PolicyCounters::default();
        c.count(&enforced);
        c.count(&audited);
        assert_eq!(c.snapshot()["denied"], 1);
        assert_eq!(c.snapshot()["audit_denied"], 1);
    }

    #[test]
    fn allow_headers_are_collected() {
        let h = HeaderMap::new();
        let rec = classified(CallKind::Http, "/", &h, "");
        let i = inputs(&rec, &facts(&h, "/http/x"));
        let p = policy(
            "package agentmesh.authz\ndecision := {\"allow\": true, \"headers\": {\"x-tier\": \"gold\"}}\n",
        );
        let out = decide(Some(&p), &i, PolicyMode::Enforce, false, "http/x");
        assert_eq!(
            out.verdict,
            Verdict::Allow {
                headers: vec![("x-tier".into(), "gold".into())]
            }
        );
    }
}
