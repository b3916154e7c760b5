//! The sidecar's own identity (design §6): an X.509-SVID from the control server's CA, on a key
//! made here that never leaves the sidecar. The first SVID is asked for with a join token; each
//! renewal, at half-life, with the current SVID as the client certificate. The SVID is kept on
//! disk (owner-only) so that a restart needs no new token, and swapped in place on renewal:
//! new handshakes use the new one, established connections are not dropped. The same object
//! serves the inbound listener's certificate, verifies peers' client certificates against the
//! trust bundle, and gives outbound calls to peers their client certificate.

use crate::config::IdentityConfig;
use agentmesh_control_api::identity::{agent_id_of, AgentId};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::utils::tls::{CertKey, WrappedX509};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One SVID with everything the TLS layers need from it.
pub struct Svid {
    pub id: AgentId,
    pub not_after_unix: u64,
    pub renew_at_unix: u64,
    cert_pem: String,
    key_pem: String,
    bundle_pem: String,
    /// For outbound calls to peers: the client certificate and key.
    pub cert_key: Arc<CertKey>,
    /// For outbound calls to peers: the roots their certificates must chain to.
    pub bundle: Arc<pingora::protocols::tls::CaType>,
    certified: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.spiffe_id())
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ders(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    Ok(certs)
}

impl Svid {
    /// Builds an SVID from PEM texts, checking that it is `expect`'s and chains to the bundle.
    fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
        expect: &AgentId,
    ) -> Result<Svid, String> {
        let chain = ders(cert_pem)?;
        let id = agent_id_of(&chain[0])?;
        if &id != expect {
            return Err(format!("the SVID is `{id}`, this sidecar is `{expect}`"));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| format!("bad certificate: {e}"))?;
        let not_after = parsed.validity().not_after.timestamp().max(0) as u64;
        let not_before = parsed.validity().not_before.timestamp().max(0) as u64;
        let bundle = ders(bundle_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("bad private key: {e}"))?;
        let signing = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| format!("unusable private key: {e}"))?;
        let certs: Vec<CertificateDer<'static>> = chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let certified = CertifiedKey::new(certs, signing);
        certified
            .keys_match()
            .map_err(|e| format!("the key is not the certificate's: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for r in &bundle {
            roots
                .add(CertificateDer::from(r.clone()))
                .map_err(|e| format!("bad trust bundle: {e}"))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| e.to_string())?;
        let key_der = match key {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => return Err("the private key must be PKCS#8".into()),
        };
        let wrapped: Vec<WrappedX509> = bundle
            .iter()
            .map(|der| WrappedX509::new(der.clone(), pingora::utils::tls::parse_x509))
            .collect();
        Ok(Svid {
            id,
            not_after_unix: not_after,
            renew_at_unix: not_before + 300 + not_after.saturating_sub(not_before + 300) / 2,
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            bundle_pem: bundle_pem.into(),
            cert_key: Arc::new(CertKey::new(chain, key_der)),
            bundle: Arc::from(wrapped.into_boxed_slice()),
            certified: Arc::new(certified),
            verifier,
        })
    }
}

/// What `/readyz` and `/config_dump` show of the identity.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdentityStatus {
    pub spiffe_id: String,
    pub ready: bool,
    pub not_after_unix: Option<u64>,
    pub renew_at_unix: Option<u64>,
    pub renewals: u64,
    pub last_error: Option<String>,
}

pub struct Identity {
    config: IdentityConfig,
    pub id: AgentId,
    current: ArcSwapOption<Svid>,
    status: Mutex<IdentityStatus>,
    http: reqwest::Client,
    /// A client of the control server's API that presents the current SVID, made again when
    /// the SVID changes (keyed by its expiry).
    mtls: Mutex<Option<(u64, reqwest::Client)>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id.spiffe_id())
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Identity {
    /// Sets up the identity of `namespace/agent`, starting on the SVID kept on disk if it is
    /// still valid.
    pub fn new(
        config: IdentityConfig,
        namespace: &str,
        agent: &str,
    ) -> Result<Arc<Identity>, String> {
        let id = AgentId::new(&config.trust_domain, namespace, agent);
        let ca = std::fs::read(&config.ca_file)
            .map_err(|e| format!("identity.ca_file {}: {e}", config.ca_file.display()))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&ca)
                    .map_err(|e| format!("identity.ca_file: {e}"))?,
            )
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let me = Arc::new(Identity {
            status: Mutex::new(IdentityStatus {
                spiffe_id: id.spiffe_id(),
                ..Default::default()
            }),
            config,
            id,
            current: ArcSwapOption::empty(),
            http,
            mtls: Mutex::new(None),
        });
        match me.restore() {
            Ok(Some(svid)) if svid.not_after_unix > unix_now() + 60 => {
                tracing::info!(spiffe_id = %me.id, not_after_unix = svid.not_after_unix, "starting on the kept SVID");
                me.install(svid);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the kept SVID is unusable; a new one will be asked for")
            }
        }
        Ok(me)
    }

    pub fn current(&self) -> Option<Arc<Svid>> {
        self.current.load_full()
    }

    pub fn status(&self) -> IdentityStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut IdentityStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn install(&self, svid: Svid) {
        self.set_status(|s| {
            s.ready = true;
            s.not_after_unix = Some(svid.not_after_unix);
            s.renew_at_unix = Some(svid.renew_at_unix);
            s.last_error = None;
        });
        self.current.store(Some(Arc::new(svid)));
    }

    fn files(&self) -> [std::path::PathBuf; 3] {
        let d = self.config.dir.clone().unwrap_or_else(|| {
            std::path::PathBuf::from(format!(".agentmesh/{}-identity", self.id.agent))
        });
        [
            d.join("svid.pem"),
            d.join("svid-key.pem"),
            d.join("bundle.pem"),
        ]
    }

    fn restore(&self) -> Result<Option<Svid>, String> {
        let [c, k, b] = self.files();
        if !c.exists() {
            return Ok(None);
        }
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
        };
        Svid::from_pem(&read(&c)?, &read(&k)?, &read(&b)?, &self.id).map(Some)
    }

    fn persist(&self, svid: &Svid) -> std::io::Result<()> {
        let [c, k, b] = self.files();
        agentmesh_control_api::write_atomically_with(&k, svid.key_pem.as_bytes(), true)?;
        agentmesh_control_api::write_atomically(&c, svid.cert_pem.as_bytes())?;
        agentmesh_control_api::write_atomically(&b, svid.bundle_pem.as_bytes())
    }

    fn join_token(&self) -> Result<String, String> {
        if let Some(f) = &self.config.join_token_file {
            return std::fs::read_to_string(f)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("identity.join_token_file {}: {e}", f.display()));
        }
        std::env::var(&self.config.join_token_env).map_err(|_| {
            format!(
                "no SVID yet and no join token: set identity.join_token_file or ${}",
                self.config.join_token_env
            )
        })
    }

    /// The control server's URL (its CA, token exchange and JWKS).
    pub fn server(&self) -> &str {
        self.config.ca_server.trim_end_matches('/')
    }

    /// A TLS 1.3 client configuration that presents the current SVID and trusts the bundle and
    /// the control server's CA (the discovery stream's).
    pub fn client_tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let svid = self.current().ok_or("this sidecar has no SVID yet")?;
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(&self.config.ca_file).map_err(|e| e.to_string())?;
        for pem in [svid.bundle_pem.as_bytes(), ca.as_slice()] {
            for der in ders(&String::from_utf8_lossy(pem))? {
                roots
                    .add(CertificateDer::from(der))
                    .map_err(|e| format!("bad root: {e}"))?;
            }
        }
        let key = PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes())
            .map_err(|e| format!("bad private key: {e}"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(svid.certified.cert.clone(), key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client of the control server that authenticates with the current SVID.
    pub fn mtls_client(&self) -> Result<reqwest::Client, String> {
        let svid = self.current().ok_or("this sidecar has no SVID yet")?;
        let mut held = self.mtls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((key, client)) = held.as_ref() {
            if *key == svid.not_after_unix {
                return Ok(client.clone());
            }
        }
        let pem = format!("{}{}", svid.cert_pem, svid.key_pem);
        let identity = reqwest::Identity::from_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let roots = [
            svid.bundle_pem.clone().into_bytes(),
            std::fs::read(&self.config.ca_file).map_err(|e| e.to_string())?,
        ];
        let mut b = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .identity(identity)
            .timeout(Duration::from_secs(10));
        for pem in roots {
            b = b.add_root_certificate(
                reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())?,
            );
        }
        let client = b.build().map_err(|e| e.to_string())?;
        *held = Some((svid.not_after_unix, client.clone()));
        Ok(client)
    }

    /// Asks the CA for a new SVID: a fresh key, a CSR, and the credential (the current SVID, or
    /// the join token the first time).
    pub async fn renew(&self) -> Result<(), String> {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut p =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        p.subject_alt_names = vec![rcgen::SanType::URI(
            self.id
                .spiffe_id()
                .try_into()
                .map_err(|e: rcgen::Error| e.to_string())?,
        )];
        let csr = p
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| e.to_string())?;
        let current = self.current();
        let (client, body) = match &current {
            Some(_) => (self.mtls_client()?, serde_json::json!({"csr": csr})),
            None => (
                self.http.clone(),
                serde_json::json!({"csr": csr, "join_token": self.join_token()?}),
            ),
        };
        let url = format!("{}/v1/svid", self.server());
        let r = client
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("cannot reach the CA at {url}: {e}"))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "the CA refused: {status}: {}",
                v["error"]["message"].as_str().unwrap_or("no detail")
            ));
        }
        let svid = Svid::from_pem(
            v["certificate"].as_str().unwrap_or_default(),
            &key.serialize_pem(),
            v["trust_bundle"].as_str().unwrap_or_default(),
            &self.id,
        )?;
        if let Err(e) = self.persist(&svid) {
            tracing::error!(error = %e, "cannot keep the SVID on disk; a restart will need a new join token");
        }
        tracing::info!(spiffe_id = %self.id, not_after_unix = svid.not_after_unix, renewal = current.is_some(), "SVID installed");
        self.set_status(|s| s.renewals += u64::from(current.is_some()));
        self.install(svid);
        Ok(())
    }
}

/// Renews the SVID at half-life, and gets the first one; retries with backoff on failure.
pub struct Renewer(pub Arc<Identity>);

#[async_trait]
impl BackgroundService for Renewer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let due = self.0.current().map(|s| s.renew_at_unix).unwrap_or(0);
            let now = unix_now();
            if now >= due {
                match self.0.renew().await {
                    Ok(()) => backoff = Duration::from_millis(500),
                    Err(e) => {
                        tracing::warn!(spiffe_id = %self.0.id, error = %e, "cannot get an SVID; retrying");
                        self.0.set_status(|s| s.last_error = Some(e));
                        let pause = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(due - now)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The inbound listener's certificate: the current SVID.
#[derive(Debug)]
pub struct ServerCert(pub Arc<Identity>);

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|s| s.certified.clone())
    }
}

/// Verifies peers' client certificates against the current SVID's trust bundle (which renewals
/// may change, as during a root rollover), logging each refusal. Without an SVID no peer is
/// accepted.
pub fn peer_verifier(identity: Arc<Identity>) -> Arc<dyn ClientCertVerifier> {
    agentmesh_control_api::verify::Following::new(
        move || {
            identity
                .current()
                .map(|s| s.verifier.clone())
                .ok_or_else(|| rustls::Error::General("this sidecar has no SVID yet".into()))
        },
        true,
    )
}

/// A verified peer's identity, attached to its connection after the handshake.
#[derive(Debug, Clone)]
pub struct Peer(pub Result<AgentId, String>);

/// Reads the peer's SPIFFE ID once its certificate was verified (only TLS 1.3 connections
/// carry one) and counts the handshake, full or resumed.
///
/// A resumed session carries the certificate of the handshake that made it, up to a day old:
/// it is verified again against the current trust bundle and clock, so resumption never
/// outlives the certificate's validity or its root's retirement.
pub struct PeerIdentity {
    pub identity: Arc<Identity>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl PeerIdentity {
    fn still_valid(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| "no client certificate".to_string())?;
        let svid = self
            .identity
            .current()
            .ok_or_else(|| "this sidecar has no SVID yet".to_string())?;
        svid.verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| format!("the resumed session's certificate is no longer valid: {e}"))
    }
}

#[async_trait]
impl pingora::listeners::TlsAccept for PeerIdentity {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let tls13 = tls
            .version()
            .is_some_and(|v| v.contains("1.3") || v.contains("1_3"));
        let peer = if !tls13 {
            Err(format!(
                "{} is not TLS 1.3",
                tls.version().unwrap_or("this protocol")
            ))
        } else {
            match tls.peer_cert_chain_der() {
                Some(chain) if tls.resumed() => self
                    .still_valid(chain)
                    .and_then(|()| agent_id_of(chain[0].as_ref())),
                Some([leaf, ..]) => agent_id_of(leaf.as_ref()),
                _ => Err("no client certificate".to_string()),
            }
        };
        self.metrics.tls_handshake(tls.resumed());
        Some(Arc::new(Peer(peer)))
    }
}
