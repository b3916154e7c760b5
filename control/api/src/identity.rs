//! SPIFFE identities as the mesh writes them (design §6): `spiffe://<trust domain>/ns/<namespace>/
//! agent/<name>` in an X.509-SVID's URI SAN, and the same identity as a DNS name
//! (`<name>.<namespace>.agent.<trust domain>`) so that a peer's certificate is checked by
//! ordinary hostname verification. Shared by the control server's CA and the sidecar.

/// The default trust domain.
pub const TRUST_DOMAIN: &str = "mesh.local";

/// An agent's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentId {
    pub trust_domain: String,
    pub namespace: String,
    pub agent: String,
}

impl AgentId {
    pub fn new(trust_domain: &str, namespace: &str, agent: &str) -> AgentId {
        AgentId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            agent: agent.into(),
        }
    }

    /// `spiffe://mesh.local/ns/default/agent/planner`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/agent/{}",
            self.trust_domain, self.namespace, self.agent
        )
    }

    /// `planner.default.agent.mesh.local`: the name a peer's certificate is verified against.
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.agent.{}",
            self.agent, self.namespace, self.trust_domain
        )
    }

    /// Reads a SPIFFE ID of the mesh's shape; `None` for anything else.
    pub fn parse(id: &str) -> Option<AgentId> {
        let rest = id.strip_prefix("spiffe://")?;
        let (domain, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("agent"), Some(agent), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let ok = |s: &str| crate::upstream::is_dns_label(s);
        (ok(domain) && ok(ns) && ok(agent)).then(|| AgentId::new(domain, ns, agent))
    }
}

impl std::fmt::Display for AgentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spiffe_id())
    }
}

/// The `spiffe://` URI SANs of a DER certificate.
pub fn spiffe_ids_of(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative names: {e}"))?;
    Ok(sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The one agent identity a certificate carries; an error for none, several, or a foreign shape.
pub fn agent_id_of(der: &[u8]) -> Result<AgentId, String> {
    let ids = spiffe_ids_of(der)?;
    match ids.as_slice() {
        [one] => AgentId::parse(one).ok_or_else(|| format!("`{one}` is not an agent SPIFFE ID")),
        [] => Err("the certificate carries no SPIFFE ID".into()),
        many => Err(format!("the certificate carries {} SPIFFE IDs", many.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_foreign_shapes_are_refused() {
        let id = AgentId::new("mesh.local", "default", "planner");
        assert_eq!(
            id.spiffe_id(),
            "spiffe://mesh.local/ns/default/agent/planner"
        );
        assert_eq!(id.dns_name(), "planner.default.agent.mesh.local");
        assert_eq!(AgentId::parse(&id.spiffe_id()), Some(id));
        for bad in [
            "spiffe://mesh.local/ns/default/sa/planner",
            "spiffe://mesh.local/ns/default/agent/planner/x",
            "spiffe://mesh.local/ns/default/agent/Planner",
            "https://mesh.local/ns/default/agent/planner",
            "spiffe://mesh.local",
        ] {
            assert_eq!(AgentId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_certificates_spiffe_id_is_read() {
        let mut p = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://mesh.local/ns/team/agent/writer"
                .try_into()
                .unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let id = agent_id_of(cert.der()).unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.agent.as_str()),
            ("team", "writer")
        );
        let plain = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        assert_eq!(
            agent_id_of(plain.cert.der()).unwrap_err(),
            "the certificate carries no SPIFFE ID"
        );
    }
}
