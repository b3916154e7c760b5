//! The control server's certificate authority (issue 6): join tokens from the CLI, X.509-SVIDs
//! signed on CSRs whose keys stay with the requester, renewal authenticated by the current SVID,
//! and every way a request is refused — each with its own status and reason.

use agentmesh_control_api::identity::{agent_id_of, spiffe_ids_of};
use agentmesh_tests::control::Control;
use agentmesh_tests::Scratch;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const MESH: &str = "agents:\n  - {name: planner}\n  - {name: writer, namespace: team}\n";

/// A key and a CSR asking for `spiffe_id` (what a sidecar makes; the key never leaves it).
fn csr_for(spiffe_id: &str) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

fn cli_token(control: &Control, agent: &str, namespace: &str, ttl: &str) -> String {
    let out = std::process::Command::new(agentmesh_tests::bin_dir().join("agentmesh"))
        .args([
            "token",
            "create",
            "--agent",
            agent,
            "--namespace",
            namespace,
            "--ttl",
            ttl,
        ])
        .args(["--server", &control.url(""), "--ca"])
        .arg(control.state_dir.join("ca.pem"))
        .arg("--admin-token-file")
        .arg(control.state_dir.join("admin-token"))
        .output()
        .expect("agentmesh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// POSTs to /v1/svid, optionally presenting a client certificate.
async fn svid(
    control: &Control,
    body: &Value,
    client_cert: Option<(&str, &rcgen::KeyPair)>,
) -> reqwest::Result<(u16, Value)> {
    api(
        control,
        reqwest::Method::POST,
        "/v1/svid",
        body,
        client_cert,
    )
    .await
}

/// A request to the registry API, optionally presenting a client certificate.
async fn api(
    control: &Control,
    method: reqwest::Method,
    path: &str,
    body: &Value,
    client_cert: Option<(&str, &rcgen::KeyPair)>,
) -> reqwest::Result<(u16, Value)> {
    let ca = std::fs::read(control.state_dir.join("ca.pem")).unwrap();
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .tls_built_in_root_certs(false);
    if let Some((cert, key)) = client_cert {
        let pem = format!("{cert}{}", key.serialize_pem());
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    let r = b
        .build()
        .unwrap()
        .request(method, control.url(path))
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn write(dir: &Path, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_are_issued_on_join_tokens_and_renewed_with_themselves() {
    let dir = Scratch::new("ca");
    let conf = dir.path("mesh");
    write(&conf, MESH);
    let mut control = Control::start(&conf).await;
    let writer = "spiffe://mesh.local/ns/team/agent/writer";

    // A first SVID on a join token from the CLI.
    let token = cli_token(&control, "writer", "team", "1h");
    assert_eq!(token.len(), 64, "{token}");
    let (key, csr) = csr_for(writer);
    let (s, v) = svid(&control, &json!({"csr": csr, "join_token": token}), None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let cert = v["certificate"].as_str().unwrap().to_string();
    let der = der_of(&cert);
    assert_eq!(spiffe_ids_of(&der).unwrap(), [writer]);
    assert_eq!(
        agent_id_of(&der).unwrap().dns_name(),
        "writer.team.agent.mesh.local"
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let dns: Vec<String> = parsed
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(dns, ["writer.team.agent.mesh.local"]);
    let life = parsed.validity().not_after.timestamp() - time_now();
    assert!(
        (23 * 3600 + 3500..=24 * 3600 + 60).contains(&life),
        "default TTL 24 h: {life} s"
    );
    assert_eq!(
        parsed.public_key().raw,
        key.public_key_der(),
        "signed on the CSR's own key"
    );
    let half = v["renew_at_unix"].as_i64().unwrap() - time_now();
    assert!(
        (12 * 3600 - 60..=12 * 3600 + 60).contains(&half),
        "renew at half-life: {half}"
    );
    assert_eq!(
        v["trust_bundle"].as_str().unwrap(),
        std::fs::read_to_string(control.state_dir.join("ca.pem")).unwrap()
    );

    // The token is single-use, also across a restart.
    let (s, v) = svid(&control, &json!({"csr": csr, "join_token": token}), None)
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["message"].as_str()),
        (401, Some("the join token was already used"))
    );
    control.restart().await;
    let (s, _) = svid(&control, &json!({"csr": csr, "join_token": token}), None)
        .await
        .unwrap();
    assert_eq!(s, 401);

    // Renewal: the current SVID is the credential, for its own identity only.
    let (key2, csr2) = csr_for(writer);
    let (s, v) = svid(&control, &json!({"csr": csr2}), Some((&cert, &key)))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        agent_id_of(&der_of(v["certificate"].as_str().unwrap()))
            .unwrap()
            .agent,
        "writer"
    );
    drop(key2);
    let (_, other) = csr_for("spiffe://mesh.local/ns/default/agent/planner");
    let (s, v) = svid(&control, &json!({"csr": other}), Some((&cert, &key)))
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (403, Some("wrong_identity")),
        "{v}"
    );

    // A certificate from another CA is refused in the handshake.
    let foreign_key = rcgen::KeyPair::generate().unwrap();
    let mut fp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    fp.subject_alt_names = vec![rcgen::SanType::URI(writer.try_into().unwrap())];
    let foreign = fp.self_signed(&foreign_key).unwrap().pem();
    let (_, csr3) = csr_for(writer);
    assert!(
        svid(
            &control,
            &json!({"csr": csr3}),
            Some((&foreign, &foreign_key))
        )
        .await
        .is_err(),
        "a client certificate from another CA must fail the handshake"
    );
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_has_its_reason() {
    let dir = Scratch::new("ca-refusals");
    let conf = dir.path("mesh");
    write(&conf, MESH);
    let control = Control::start(&conf).await;
    let planner = "spiffe://mesh.local/ns/default/agent/planner";
    let (_, csr) = csr_for(planner);

    let (s, v) = svid(&control, &json!({"csr": csr}), None).await.unwrap();
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (401, Some("no_credential")),
        "{v}"
    );
    let (s, v) = svid(&control, &json!({"csr": csr, "join_token": "feed"}), None)
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["message"].as_str()),
        (401, Some("unknown join token"))
    );

    // Expired.
    let (s, t) = control
        .post(
            "/v1/join-tokens",
            &json!({"agent": "planner", "ttl_seconds": 1}),
            true,
        )
        .await;
    assert_eq!(s, 201, "{t}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (s, v) = svid(
        &control,
        &json!({"csr": csr, "join_token": t["token"]}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (s, v["error"]["message"].as_str()),
        (401, Some("the join token expired"))
    );

    // A token for one agent, a CSR for another: refused, and the token is not used up.
    let token = cli_token(&control, "planner", "default", "10m");
    let (_, wrong) = csr_for("spiffe://mesh.local/ns/team/agent/writer");
    let (s, v) = svid(&control, &json!({"csr": wrong, "join_token": token}), None)
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (403, Some("wrong_identity")),
        "{v}"
    );
    let (s, v) = svid(
        &control,
        &json!({"csr": "not a CSR", "join_token": token}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (400, Some("bad_csr")),
        "{v}"
    );
    let (s, v) = svid(&control, &json!({"csr": csr, "join_token": token}), None)
        .await
        .unwrap();
    assert_eq!(s, 200, "the token survived the refusals: {v}");

    // Tokens: admin only, for known agents, in their namespace.
    let (s, _) = control
        .post("/v1/join-tokens", &json!({"agent": "planner"}), false)
        .await;
    assert_eq!(s, 401);
    let (s, _) = control
        .post("/v1/join-tokens", &json!({"agent": "nobody"}), true)
        .await;
    assert_eq!(s, 404);
    let (s, v) = control
        .post("/v1/join-tokens", &json!({"agent": "writer"}), true)
        .await;
    assert_eq!(s, 400, "writer lives in namespace team: {v}");
    let bundle = control.get("/v1/trust-bundle").await;
    assert_eq!(bundle["trust_domain"], "mesh.local");
    assert!(bundle["roots"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
}

/// A discovery stream over mTLS with `agent`'s SVID (key and PEM certificate), subscribing as
/// `node_agent`: the first response, or the stream's error.
async fn subscribe(
    control: &Control,
    cert_pem: &str,
    key: &rcgen::KeyPair,
    node_agent: &str,
) -> Result<agentmesh_control_api::discovery::DeltaDiscoveryResponse, tonic::Status> {
    use agentmesh_control_api::discovery::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient as Client,
        DeltaDiscoveryRequest, Node,
    };
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(control.state_dir.join("ca.pem")).unwrap();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let port = control.xds;
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let s = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("a TLS connection to the discovery port");
    let first = DeltaDiscoveryRequest {
        node: Some(Node {
            id: format!("test-{node_agent}"),
            agent: node_agent.into(),
            namespace: "default".into(),
            ..Default::default()
        }),
        type_url: agentmesh_control_api::TYPE_URL.into(),
        ..Default::default()
    };
    let mut inbound = Client::new(channel)
        .delta_resources(tokio_stream::iter(vec![first]))
        .await?
        .into_inner();
    inbound
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("the stream ended"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_stream_is_bound_to_the_agent_its_svid_names() {
    let dir = Scratch::new("ca-bind");
    let conf = dir.path("mesh");
    agentmesh_tests::control::write_mesh(
        &conf,
        "secrets: [{name: k, env: PATH}]\npolicies: [{name: p, path: policy}]\nagents:\n  - {name: planner, policy: p, secrets: [k]}\n  - {name: writer, namespace: team}\n",
    );
    let control = Control::start(&conf).await;
    let token = cli_token(&control, "planner", "default", "1h");
    let (key, csr) = csr_for("spiffe://mesh.local/ns/default/agent/planner");
    let (s, v) = svid(&control, &json!({"csr": csr, "join_token": token}), None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let cert = v["certificate"].as_str().unwrap().to_string();

    // As itself, over mTLS: its grant, secret included.
    let first = subscribe(&control, &cert, &key, "planner").await.unwrap();
    let names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&"secret/k"), "{names:?}");
    // Claiming another agent with this SVID: refused.
    let e = subscribe(&control, &cert, &key, "writer")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("planner"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_agents_own_svid_announces_its_card() {
    let dir = Scratch::new("ca-card");
    let conf = dir.path("mesh");
    write(&conf, MESH);
    let control = Control::start(&conf).await;
    let token = cli_token(&control, "planner", "default", "1h");
    let (key, csr) = csr_for("spiffe://mesh.local/ns/default/agent/planner");
    let (s, v) = svid(&control, &json!({"csr": csr, "join_token": token}), None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let cert = v["certificate"].as_str().unwrap().to_string();
    let put = reqwest::Method::PUT;
    let card = json!({"name": "planner", "protocolVersion": "0.3.0", "skills": [{"id": "plan"}]});

    let (s, v) = api(
        &control,
        put.clone(),
        "/v1/agents/planner/card",
        &card,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (401, Some("no_credential")),
        "{v}"
    );
    let (s, v) = api(
        &control,
        put.clone(),
        "/v1/agents/writer/card",
        &card,
        Some((&cert, &key)),
    )
    .await
    .unwrap();
    assert_eq!(s, 403, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("only its own card"));
    let odd = json!({"name": "someone-else"});
    let (s, _) = api(
        &control,
        put.clone(),
        "/v1/agents/planner/card",
        &odd,
        Some((&cert, &key)),
    )
    .await
    .unwrap();
    assert_eq!(s, 400);
    // Its own: kept, served as the agent's card, and persisted.
    let (s, _) = api(
        &control,
        put,
        "/v1/agents/planner/card",
        &card,
        Some((&cert, &key)),
    )
    .await
    .unwrap();
    assert_eq!(s, 204);
    let served: Value = control.get("/v1/agents/planner/card").await;
    assert_eq!(served, card);
    let saved = std::fs::read_to_string(control.state_dir.join("registry.json")).unwrap();
    assert!(saved.contains("\"protocolVersion\": \"0.3.0\""), "{saved}");
}
