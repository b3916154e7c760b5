//! Token exchange on the way out (design §3 step 4, RFC 8693): before a call to a peer agent
//! or a tool, the caller's token is exchanged at the control server — authenticated with this
//! sidecar's SVID — for one narrowed to that destination, which replaces it. Exchanged tokens
//! are cached per subject and audience until shortly before they expire. The original token
//! never leaves the sidecar.

use crate::identity::Identity;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An exchanged token is reused until this long before it expires.
const MARGIN: Duration = Duration::from_secs(30);

pub struct Exchanger {
    identity: Arc<Identity>,
    cache: moka::sync::Cache<(String, String), (Arc<str>, Instant)>,
}

impl Exchanger {
    pub fn new(identity: Arc<Identity>) -> Exchanger {
        Exchanger {
            identity,
            cache: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
        }
    }

    /// A token for `audience` in place of `subject`.
    pub async fn token(&self, subject: &str, audience: &str) -> Result<Arc<str>, String> {
        // Keyed by the token itself: no digest collision can hand one caller another's token.
        let key = (subject.to_string(), audience.to_string());
        if let Some((t, until)) = self.cache.get(&key) {
            if Instant::now() < until {
                return Ok(t);
            }
        }
        let client = self.identity.mtls_client()?;
        let url = format!("{}/v1/token", self.identity.server());
        let r = client
            .post(&url)
            .form(&[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", subject),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("audience", audience),
                (
                    "requested_token_type",
                    "urn:ietf:params:oauth:token-type:jwt",
                ),
            ])
            .send()
            .await
            .map_err(|e| format!("cannot reach the token service at {url}: {e}"))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "the token service refused: {}: {}",
                v["error"].as_str().unwrap_or("error"),
                v["error_description"].as_str().unwrap_or("no detail")
            ));
        }
        let token: Arc<str> = v["access_token"]
            .as_str()
            .ok_or("the token service answered without a token")?
            .into();
        let life = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(0));
        if life > MARGIN {
            self.cache
                .insert(key, (token.clone(), Instant::now() + life - MARGIN));
        }
        Ok(token)
    }
}
