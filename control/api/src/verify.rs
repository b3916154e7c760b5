//! A client-certificate verifier that follows a changing trust bundle: it hands each check to
//! whichever verifier its source returns at that moment. The sidecar's inbound listener follows
//! its current SVID's bundle, the control server's API follows the roots of a rollover.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use std::sync::Arc;

type Source = dyn Fn() -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> + Send + Sync;

pub struct Following {
    current: Box<Source>,
    /// Log each refused certificate with the SPIFFE ID it claims.
    log_refusals: bool,
}

impl Following {
    /// Client certificates are asked for but optional: a client without one completes the
    /// handshake and is refused, with the reason, by whatever serves it.
    pub fn new(
        current: impl Fn() -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> + Send + Sync + 'static,
        log_refusals: bool,
    ) -> Arc<Following> {
        Arc::new(Following {
            current: Box::new(current),
            log_refusals,
        })
    }
}

impl std::fmt::Debug for Following {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Following")
    }
}

impl ClientCertVerifier for Following {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verdict = (self.current)()?.verify_client_cert(end_entity, intermediates, now);
        if let (Err(e), true) = (&verdict, self.log_refusals) {
            let claimed = crate::identity::agent_id_of(end_entity).map(|i| i.spiffe_id());
            tracing::warn!(peer = ?claimed, reason = %e, "peer certificate refused");
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        (self.current)()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        (self.current)()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
