//! End-user JWTs through a running sidecar (issue 6): a valid token's claims reach the policy as
//! `input.user` and the token does not reach the upstream; each attack — `alg: none`, a wrong
//! key, HS/RS confusion, expired, not yet valid, wrong audience, unknown issuer, unknown key —
//! is a 401 with its own reason, logged; a rotated key is picked up by refreshing the JWKS.

use agentmesh_tests::echo::Echo;
use agentmesh_tests::{Scratch, Sidecar};
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

const ISSUER: &str = "https://idp.example.com";

struct Key {
    kid: String,
    pair: rcgen::KeyPair,
}

impl Key {
    fn new(kid: &str) -> Key {
        Key {
            kid: kid.into(),
            pair: rcgen::KeyPair::generate().unwrap(), // ECDSA P-256
        }
    }

    fn jwk(&self) -> Value {
        let raw = self.pair.public_key_raw(); // 0x04 || X || Y
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
               "x": b64(&raw[1..33]), "y": b64(&raw[33..65])})
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        let k = EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap();
        encode(&h, claims, &k).unwrap()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(over: Value) -> Value {
    let mut c = json!({"iss": ISSUER, "sub": "alice", "aud": "agentmesh", "exp": now() + 600,
                       "iat": now(), "team": "research"});
    for (k, v) in over.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn unsigned(header: Value, claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(&header), b64(claims))
}

async fn call(sc: &Sidecar, token: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(sc.url("/http/echo/hello"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn refused(sc: &Sidecar, token: &str, reason: &str) {
    let (s, v) = call(sc, Some(token)).await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["type"], "invalid_token", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(reason), "want `{reason}`, got `{msg}`");
}

fn body(echo: &Echo, required: bool) -> String {
    format!(
        "upstreams: [{{name: http/echo, endpoints: [\"{}\"]}}]\njwt:\n  required: {required}\n  issuers:\n    - {{issuer: \"{ISSUER}\", jwks_uri: \"{}\", audiences: [agentmesh], algorithms: [ES256, RS256]}}\n",
        echo.url(""),
        echo.url("/jwks.json")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_validated_and_each_attack_has_its_reason() {
    let dir = Scratch::new("jwt");
    let echo = Echo::start().await;
    let key = Key::new("k1");
    echo.set_jwks(&json!({"keys": [key.jwk()]}));
    let sc = Sidecar::start(&dir, &body(&echo, false)).await;

    // Valid: the claims reach the policy; the token does not reach the upstream.
    let good = key.sign(&claims(json!({})));
    let (s, v) = call(&sc, Some(&good)).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["headers"].get("authorization").is_none(),
        "the user's token reached the upstream: {v}"
    );
    let d = sc.decisions();
    assert_eq!(d[0]["input"]["user"]["sub"], "alice", "{d:?}");
    assert_eq!(d[0]["input"]["user"]["claims"]["team"], "research");
    // No token: fine unless required; a provider-style key is not taken for a JWT.
    assert_eq!(call(&sc, None).await.0, 200);
    assert_eq!(call(&sc, Some("sk-not-a-jwt")).await.0, 200);

    // Attacks, each with its reason.
    refused(
        &sc,
        &unsigned(json!({"alg": "none", "kid": "k1"}), &claims(json!({}))),
        "algorithm `none` is not allowed",
    )
    .await;
    let impostor = Key {
        kid: "k1".into(),
        pair: rcgen::KeyPair::generate().unwrap(),
    };
    refused(
        &sc,
        &impostor.sign(&claims(json!({}))),
        "the signature does not verify",
    )
    .await;
    // HS256 keyed with the public key: the RS/HS confusion.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    let confused = encode(
        &hs,
        &claims(json!({})),
        &EncodingKey::from_secret(key.pair.public_key_pem().as_bytes()),
    )
    .unwrap();
    refused(&sc, &confused, "algorithm `HS256` is not allowed").await;
    refused(
        &sc,
        &key.sign(&claims(json!({"exp": now() - 120}))),
        "the token expired",
    )
    .await;
    assert_eq!(
        call(&sc, Some(&key.sign(&claims(json!({"exp": now() - 10})))))
            .await
            .0,
        200,
        "within the 30 s leeway"
    );
    refused(
        &sc,
        &key.sign(&claims(json!({"nbf": now() + 300}))),
        "the token is not valid yet",
    )
    .await;
    refused(
        &sc,
        &key.sign(&claims(json!({"aud": "someone-else"}))),
        "the token is not for this audience",
    )
    .await;
    refused(
        &sc,
        &key.sign(&claims(json!({"iss": "https://evil.example"}))),
        "issuer `https://evil.example` is not trusted",
    )
    .await;
    refused(&sc, "a.b.c", "the token is not a well-formed JWT").await;

    // A rotated key: an unknown kid refreshes the JWKS once; a forged kid cannot force more.
    let fetches = echo.jwks_fetches();
    let k2 = Key::new("k2");
    echo.set_jwks(&json!({"keys": [key.jwk(), k2.jwk()]}));
    assert_eq!(call(&sc, Some(&k2.sign(&claims(json!({}))))).await.0, 200);
    assert_eq!(echo.jwks_fetches(), fetches + 1);
    refused(
        &sc,
        &Key::new("k3").sign(&claims(json!({}))),
        "no key `k3` in the issuer's JWKS",
    )
    .await;
    refused(&sc, &Key::new("k4").sign(&claims(json!({}))), "no key `k4`").await;
    assert_eq!(
        echo.jwks_fetches(),
        fetches + 1,
        "refreshes are rate-limited"
    );

    let log = std::fs::read_to_string(dir.path("sidecar.log")).unwrap();
    assert!(log.matches("end-user token refused").count() >= 9, "{log}");
    assert!(!log.contains(&good), "tokens never appear in logs");
    let access = std::fs::read_to_string(&sc.access_log).unwrap();
    assert!(!access.contains(&good[..40]), "nor in the access log");

    // Required: a call without a token is refused.
    sc.rewrite(&body(&echo, true));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while call(&sc, None).await.0 != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "`required` never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_, v) = call(&sc, None).await;
    assert_eq!(v["error"]["message"], "a token is required");
    assert_eq!(call(&sc, Some(&good)).await.0, 200);
}
