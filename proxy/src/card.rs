//! The local agent's A2A card, announced to the control server's registry: read from the agent
//! (`GET <inbound.forward_to>/.well-known/agent-card.json`) and sent with `PUT
//! /v1/agents/<agent>/card`, authenticated by the sidecar's SVID (the control server takes a
//! card only from the agent it names). Sent when it first reads, then again whenever it
//! changes, checked every 30 s; an agent without a card is retried quietly.

use crate::identity::Identity;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const EVERY: Duration = Duration::from_secs(30);

pub struct Announcer {
    pub identity: Arc<Identity>,
    pub agent: String,
    pub forward_to: SocketAddr,
}

impl Announcer {
    /// Reads the card and sends it if it is new; the card sent.
    async fn once(
        &self,
        local: &reqwest::Client,
        sent: Option<&serde_json::Value>,
    ) -> Result<Option<serde_json::Value>, String> {
        let url = format!("http://{}/.well-known/agent-card.json", self.forward_to);
        let r = local
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("{url}: {}", r.status()));
        }
        let card: serde_json::Value = r
            .json()
            .await
            .map_err(|e| format!("{url}: not a card: {e}"))?;
        if sent == Some(&card) {
            return Ok(None);
        }
        let client = self.identity.mtls_client()?;
        let put = format!("{}/v1/agents/{}/card", self.identity.server(), self.agent);
        let r = client
            .put(&put)
            .json(&card)
            .send()
            .await
            .map_err(|e| format!("{put}: {e}"))?;
        if !r.status().is_success() {
            let status = r.status();
            return Err(format!(
                "{put}: {status}: {}",
                r.text().await.unwrap_or_default()
            ));
        }
        tracing::info!(agent = %self.agent, "agent card announced to the control server");
        Ok(Some(card))
    }
}

#[async_trait]
impl BackgroundService for Announcer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let local = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let mut sent = None;
        let mut pause = Duration::from_millis(200);
        loop {
            if self.identity.current().is_some() {
                match self.once(&local, sent.as_ref()).await {
                    Ok(Some(card)) => {
                        sent = Some(card);
                        pause = EVERY;
                    }
                    Ok(None) => pause = EVERY,
                    Err(e) => {
                        tracing::debug!(agent = %self.agent, error = %e, "agent card not announced yet");
                        pause = (pause * 2).min(EVERY);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
