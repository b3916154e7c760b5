//! Token exchange through the mesh (issue 6, RFC 8693): a user's token enters at the planner's
//! sidecar and never leaves it; each hop gets a token for its destination alone, with the
//! delegation chain in nested `act` claims — three hops deep here — that the callee's policy
//! sees; a token replayed at the wrong hop is refused; the token service answers RFC errors.

use agentmesh_tests::control::{write_file, Control, ALLOW_ALL};
use agentmesh_tests::echo::Echo;
use agentmesh_tests::{Scratch, Sidecar};
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

const IDP: &str = "https://idp.example.com";

fn spiffe(agent: &str) -> String {
    format!("spiffe://mesh.local/ns/default/agent/{agent}")
}

fn claims_of(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// Calls through a sidecar with a bearer token; the echo (every agent's server here) answers
/// with the headers that reached it.
async fn hop(sc: &Sidecar, path: &str, token: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(sc.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn bearer(echoed: &Value) -> String {
    echoed["headers"]["authorization"]
        .as_str()
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_token_is_exchanged_at_each_hop_with_the_act_chain() {
    let dir = Scratch::new("xchg");
    let echo = Echo::start().await;
    // The user's identity provider.
    let idp_key = rcgen::KeyPair::generate().unwrap();
    let raw = idp_key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    echo.set_jwks(
        &json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "idp",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]}),
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("idp".into());
    let user = encode(
        &h,
        &json!({"iss": IDP, "sub": "alice", "aud": "agentmesh", "exp": now + 600, "scope": "read write", "team": "research"}),
        &EncodingKey::from_ec_pem(idp_key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();

    let conf = dir.path("mesh");
    write_file(&conf.join("policy/authz.rego"), ALLOW_ALL);
    let jwks = echo.url("/jwks.json");
    std::fs::write(
        conf.join("mesh.yaml"),
        format!(
            "issuers: [{{issuer: \"{IDP}\", jwks_uri: \"{jwks}\", audiences: [agentmesh], algorithms: [ES256]}}]\npolicies: [{{name: p, path: policy}}]\nagents:\n  - {{name: planner, calls: {{agents: [researcher]}}, policy: p}}\n  - {{name: researcher, calls: {{agents: [writer]}}, policy: p}}\n  - {{name: writer, calls: {{agents: [editor]}}, policy: p}}\n  - {{name: editor, policy: p}}\n"
        ),
    )
    .unwrap();
    let control = Control::start(&conf).await;
    let idp = format!("jwt: {{issuers: [{{issuer: \"{IDP}\", jwks_uri: \"{jwks}\", audiences: [agentmesh], algorithms: [ES256]}}]}}\n");
    let dirs: Vec<Scratch> = (0..4).map(|i| Scratch::new(&format!("xchg-{i}"))).collect();
    let planner = control
        .identity_sidecar(&dirs[0], "planner", None, &idp)
        .await;
    let researcher = control
        .identity_sidecar(&dirs[1], "researcher", Some(echo.port), "")
        .await;
    let writer = control
        .identity_sidecar(&dirs[2], "writer", Some(echo.port), "")
        .await;
    let _editor = control
        .identity_sidecar(&dirs[3], "editor", Some(echo.port), "")
        .await;
    for (sc, peer) in [
        (&planner, "researcher"),
        (&researcher, "writer"),
        (&writer, "editor"),
    ] {
        let name = format!("agents/{peer}");
        sc.wait_dump(|d| {
            d["config"]["upstreams"]
                .as_array()
                .is_some_and(|u| u.iter().any(|u| u["name"] == name.as_str()))
        })
        .await;
    }

    // Hop 1: the user's token goes in at the planner; the researcher gets its own token.
    let (s, v) = hop(&planner, "/agents/researcher/hop1", &user).await;
    assert_eq!(s, 200, "{v}");
    let t1 = bearer(&v);
    let c1 = claims_of(&t1);
    assert_eq!(c1["sub"], "alice");
    assert_eq!(c1["aud"], spiffe("researcher"));
    assert_eq!(c1["iss"], "spiffe://mesh.local/control");
    assert_eq!(c1["act"], json!({"sub": spiffe("planner")}));
    assert_eq!(c1["scope"], "read write");
    assert_eq!(c1["team"], "research");
    // The researcher's policy saw who acts for whom.
    let d = researcher.decisions();
    assert_eq!(d[0]["input"]["user"]["sub"], "alice", "{d:?}");
    assert_eq!(
        d[0]["input"]["user"]["claims"]["act"]["sub"],
        spiffe("planner")
    );
    assert_eq!(d[0]["input"]["source"]["spiffe_id"], spiffe("planner"));

    // Hops 2 and 3: each exchange nests the chain one deeper.
    let (s, v) = hop(&researcher, "/agents/writer/hop2", &t1).await;
    assert_eq!(s, 200, "{v}");
    let t2 = bearer(&v);
    let c2 = claims_of(&t2);
    assert_eq!(c2["aud"], spiffe("writer"));
    assert_eq!(
        c2["act"],
        json!({"sub": spiffe("researcher"), "act": {"sub": spiffe("planner")}})
    );
    let (s, v) = hop(&writer, "/agents/editor/hop3", &t2).await;
    assert_eq!(s, 200, "{v}");
    let c3 = claims_of(&bearer(&v));
    assert_eq!(c3["sub"], "alice");
    assert_eq!(c3["aud"], spiffe("editor"));
    assert_eq!(
        c3["act"],
        json!({"sub": spiffe("writer"), "act": {"sub": spiffe("researcher"), "act": {"sub": spiffe("planner")}}}),
        "three actors, newest outermost"
    );
    assert!(
        c3["exp"].as_u64().unwrap() <= now + 600,
        "never past the user's token"
    );

    // The user's token reached no agent; T1 replayed at the writer's sidecar is refused there.
    for seen in echo.seen() {
        assert!(
            !seen.to_string().contains(&user),
            "the original token reached an upstream: {seen}"
        );
    }
    let (s, v) = hop(&writer, "/agents/editor/replay", &t1).await;
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("audience"),
        "{v}"
    );
    // The cache: the same token to the same destination is exchanged once.
    let (s, v2) = hop(&planner, "/agents/researcher/again", &user).await;
    assert_eq!(s, 200);
    assert_eq!(bearer(&v2), t1, "reused until near expiry");

    // The token service itself: RFC 8693 errors, and only over mTLS.
    let ca = std::fs::read(control.state_dir.join("ca.pem")).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let r = client
        .post(control.url("/v1/token"))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", user.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_client");
    let jwks: Value = client
        .get(control.url("/v1/jwks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
}
