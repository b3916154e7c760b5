//! The decision a policy yields for one call: a boolean, or an object
//! `{"allow": bool, "reason": str, "status": int, "headers": {name: value}}` (design §4).

use crate::PolicyError;
use serde::Serialize;

/// What the policy said about one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allow: bool,
    /// Why: the rule's own words, shown to the caller on a deny and logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The status a deny answers with (default 403).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Headers an allow adds to the upstream request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

/// The status of a deny when the policy names none.
pub const DEFAULT_DENY_STATUS: u16 = 403;

impl Decision {
    pub fn deny(reason: impl Into<String>) -> Self {
        Decision {
            allow: false,
            reason: Some(reason.into()),
            status: None,
            headers: Vec::new(),
        }
    }

    /// The status a deny answers with: the policy's, if it is a 4xx or 5xx, else 403.
    pub fn deny_status(&self) -> u16 {
        self.status
            .filter(|s| (400..600).contains(s))
            .unwrap_or(DEFAULT_DENY_STATUS)
    }

    /// Reads the decision rule's value. An undefined decision is a deny: nothing allowed the
    /// call. Anything else that is not a boolean or a well-formed object is an error, which the
    /// caller treats like any evaluation error (deny unless the route fails open).
    pub fn from_json(v: &serde_json::Value) -> Result<Decision, PolicyError> {
        use serde_json::Value as J;
        let bad = || PolicyError::BadDecision(truncate(&v.to_string()));
        match v {
            J::Bool(b) => Ok(Decision {
                allow: *b,
                reason: None,
                status: None,
                headers: Vec::new(),
            }),
            J::Object(m) => {
                for k in m.keys() {
                    if !matches!(k.as_str(), "allow" | "reason" | "status" | "headers") {
                        return Err(PolicyError::BadDecision(format!(
                            "unknown field `{k}` in {}",
                            truncate(&v.to_string())
                        )));
                    }
                }
                let allow = match m.get("allow") {
                    None => false,
                    Some(J::Bool(b)) => *b,
                    Some(_) => return Err(bad()),
                };
                let reason = match m.get("reason") {
                    None | Some(J::Null) => None,
                    Some(J::String(s)) => Some(s.clone()),
                    Some(_) => return Err(bad()),
                };
                let status = match m.get("status") {
                    None | Some(J::Null) => None,
                    Some(J::Number(n)) => Some(
                        n.as_u64()
                            .and_then(|s| u16::try_from(s).ok())
                            .filter(|s| (100..600).contains(s))
                            .ok_or_else(bad)?,
                    ),
                    Some(_) => return Err(bad()),
                };
                let mut headers = Vec::new();
                match m.get("headers") {
                    None | Some(J::Null) => {}
                    Some(J::Object(h)) => {
                        for (k, val) in h {
                            let J::String(s) = val else { return Err(bad()) };
                            if !valid_header(k, s) {
                                return Err(PolicyError::BadDecision(format!(
                                    "header `{k}` is not a valid HTTP header"
                                )));
                            }
                            headers.push((k.to_ascii_lowercase(), s.clone()));
                        }
                    }
                    Some(_) => return Err(bad()),
                }
                Ok(Decision {
                    allow,
                    reason,
                    status,
                    headers,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// RFC 9110 token for the name, visible ASCII and spaces for the value.
fn valid_header(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        && value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn booleans_and_objects_are_decisions() {
        assert!(Decision::from_json(&json!(true)).unwrap().allow);
        assert!(!Decision::from_json(&json!(false)).unwrap().allow);
        let d = Decision::from_json(&json!({
            "allow": false, "reason": "tool not declared", "status": 429,
            "headers": {"X-Mesh-Tier": "gold"}
        }))
        .unwrap();
        assert!(!d.allow);
        assert_eq!(d.reason.as_deref(), Some("tool not declared"));
        assert_eq!(d.deny_status(), 429);
        assert_eq!(d.headers, vec![("x-mesh-tier".into(), "gold".into())]);
        // An object without `allow` does not allow.
        assert!(!Decision::from_json(&json!({"reason": "x"})).unwrap().allow);
    }

    #[test]
    fn a_deny_defaults_to_403_and_ignores_non_error_statuses() {
        assert_eq!(Decision::deny("no").deny_status(), 403);
        let d = Decision::from_json(&json!({"allow": false, "status": 200})).unwrap();
        assert_eq!(d.deny_status(), 403);
    }

    #[test]
    fn malformed_decisions_are_errors() {
        for bad in [
            json!("yes"),
            json!(1),
            json!({"allow": "true"}),
            json!({"allow": true, "status": 99}),
            json!({"allow": true, "status": "403"}),
            json!({"allow": true, "headers": {"x": 1}}),
            json!({"allow": true, "headers": {"bad name": "v"}}),
            json!({"allow": true, "headers": {"x": "line\nbreak"}}),
            json!({"allow": true, "alow": true}),
        ] {
            assert!(
                Decision::from_json(&bad).is_err(),
                "{bad} should be refused"
            );
        }
    }
}
