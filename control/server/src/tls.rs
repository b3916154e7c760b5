//! The control server's TLS material: a root CA made on first start and kept in the state
//! directory (`ca.pem`, `ca-key.pem`, mode 0600), and the serving certificate of the registry
//! API (15012), signed by it at each start for `localhost`, `127.0.0.1` and the host's name.
//! Clients trust `ca.pem`. (Issue 'Zero-trust identity' signs the sidecars' SVIDs with the same
//! root.)

use agentmesh_control_api::{write_atomically, write_atomically_with};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use std::path::Path;
use std::sync::Arc;

/// The root CA: its certificate (PEM) and what signs with it.
pub struct Root {
    pub cert_pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A new root's parameters; its name carries a digest of its key, so that the old and the new
/// root of a rollover are told apart by name.
fn root_params(key: &KeyPair) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let tag = crate::resources::digest(&key.public_key_der());
    p.distinguished_name.push(
        DnType::CommonName,
        format!("agentmesh root CA {}", &tag[..8]),
    );
    p.distinguished_name
        .push(DnType::OrganizationName, "agentmesh");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 1, 1);
    Ok(p)
}

impl Root {
    /// Loads the root from `dir` (`ca.pem`, `ca-key.pem`), or makes one there on first start.
    pub fn load_or_create(dir: &Path) -> Result<Root, String> {
        match Root::load(&dir.join("ca.pem"), &dir.join("ca-key.pem"))? {
            Some(r) => Ok(r),
            None => Root::create(&dir.join("ca.pem"), &dir.join("ca-key.pem")),
        }
    }

    /// Loads a root kept in two files; `None` when the key file is not there.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Option<Root>, String> {
        if !key_file.exists() {
            return Ok(None);
        }
        let key_pem = std::fs::read_to_string(key_file)
            .map_err(|e| format!("cannot read {}: {e}", key_file.display()))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| format!("{}: {e}", key_file.display()))?;
        let cert_pem = std::fs::read_to_string(cert_file)
            .map_err(|e| format!("cannot read {}: {e}", cert_file.display()))?;
        // The stored certificate's own name and extensions, with the same key: what it signs
        // verifies against the stored certificate.
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| format!("{}: {e}", cert_file.display()))?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Some(Root {
            cert_pem,
            cert,
            key,
        }))
    }

    /// Makes a new root and keeps it in two files (the key owner-only).
    pub fn create(cert_file: &Path, key_file: &Path) -> Result<Root, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = root_params(&key)
            .and_then(|p| p.self_signed(&key))
            .map_err(|e| e.to_string())?;
        let cert_pem = cert.pem();
        write_secret(key_file, key.serialize_pem().as_bytes())?;
        write_atomically(cert_file, cert_pem.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", cert_file.display()))?;
        tracing::info!(ca = %cert_file.display(), "made a new root CA");
        Ok(Root {
            cert_pem,
            cert,
            key,
        })
    }

    /// A server config for `names` (DNS names or IP addresses), signed by the root.
    /// A serving certificate for `names` (DNS names or IP addresses), signed by this root.
    pub fn serving_key(&self, names: &[String]) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        p.distinguished_name
            .push(DnType::CommonName, "agentmesh-control");
        for n in names {
            p.subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => {
                        SanType::DnsName(n.as_str().try_into().map_err(|e| format!("{n}: {e}"))?)
                    }
                });
        }
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| e.to_string())?;
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert.der().clone()],
            signing,
        )))
    }
}

/// The API's server configuration: its certificate from `certs` (which follows the signing
/// root), client certificates checked by `clients` (a sidecar renewing its SVID presents the
/// current one; other clients present none).
pub fn server_config(
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
    clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| e.to_string())?
    .with_client_cert_verifier(clients)
    .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignError {
    #[error("the CSR is not a valid, self-signed PKCS#10 request")]
    BadCsr,
    #[error("the CSR asks for {asked:?}; this credential may only get `{allowed}`")]
    WrongIdentity { asked: Vec<String>, allowed: String },
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A signed X.509-SVID.
pub struct Svid {
    pub cert_pem: String,
    pub not_after_unix: u64,
}

impl Root {
    /// Signs an X.509-SVID for `id` on a CSR (its signature proves the requester holds the key,
    /// which never leaves it). The CSR must ask for exactly `id`'s SPIFFE ID; everything else in
    /// it is ignored: the certificate carries the SPIFFE ID (URI SAN) and its DNS form, a client
    /// and server usage, and lives `ttl`.
    pub fn sign_svid(
        &self,
        csr_pem: &str,
        id: &agentmesh_control_api::identity::AgentId,
        ttl: std::time::Duration,
    ) -> Result<Svid, SignError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|_| SignError::BadCsr)?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [id.spiffe_id()] {
            return Err(SignError::WrongIdentity {
                asked,
                allowed: id.spiffe_id(),
            });
        }
        let sign = |e: rcgen::Error| SignError::Sign(e.to_string());
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![
            SanType::URI(id.spiffe_id().try_into().map_err(sign)?),
            SanType::DnsName(id.dns_name().try_into().map_err(sign)?),
        ];
        let now = time::OffsetDateTime::now_utc();
        // A little slack for clocks behind the CA's.
        p.not_before = now - time::Duration::minutes(5);
        let not_after = now + ttl;
        p.not_after = not_after;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        csr.params = p;
        let cert = csr.signed_by(&self.cert, &self.key).map_err(sign)?;
        Ok(Svid {
            cert_pem: cert.pem(),
            not_after_unix: u64::try_from(not_after.unix_timestamp()).unwrap_or(0),
        })
    }
}

/// Writes a file only its owner can read.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), String> {
    write_atomically_with(path, bytes, true)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
