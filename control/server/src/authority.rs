//! The certificate authority's roots and their rollover. One root signs (`ca.pem`); a staged
//! next root (`ca-next.pem`) and retired ones (`ca-previous.pem`) are trusted beside it, so that a
//! rollover never leaves a sidecar unable to verify a peer:
//!
//! 1. `stage`: a new root is made and added to the trust bundle; the old one still signs. Every
//!    sidecar picks the new bundle up at its next renewal.
//! 2. `activate`: the new root signs; the old one stays in the bundle, so SVIDs it signed are
//!    still accepted until they are renewed.
//! 3. `retire`: the old root leaves the bundle.
//!
//! Every state is kept in the state directory, and the API's client-certificate verifier follows
//! the bundle as it changes.

use crate::tls::Root;
use agentmesh_control_api::write_atomically;
use arc_swap::ArcSwap;
use rustls::pki_types::{pem::PemObject, CertificateDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

struct Roots {
    signing: Arc<Root>,
    next: Option<Arc<Root>>,
    /// Retired roots still trusted (PEM).
    previous: String,
    verifier: Arc<dyn ClientCertVerifier>,
}

pub struct Authority {
    dir: PathBuf,
    roots: ArcSwap<Roots>,
    changing: Mutex<()>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(signing: Arc<Root>, next: Option<Arc<Root>>, previous: String) -> Result<Roots, String> {
    let mut store = rustls::RootCertStore::empty();
    let bundle = bundle_of(&signing, next.as_deref(), &previous);
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        let cert = cert.map_err(|e| format!("bad root: {e}"))?;
        store.add(cert).map_err(|e| format!("bad root: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Roots {
        signing,
        next,
        previous,
        verifier,
    })
}

fn bundle_of(signing: &Root, next: Option<&Root>, previous: &str) -> String {
    let mut b = signing.cert_pem.clone();
    if let Some(n) = next {
        b.push_str(&n.cert_pem);
    }
    b.push_str(previous);
    b
}

impl Authority {
    /// Opens the roots kept in `dir`, making the first one on first start.
    pub fn open(dir: &Path) -> Result<Arc<Authority>, String> {
        let signing = Arc::new(Root::load_or_create(dir)?);
        let next =
            Root::load(&dir.join("ca-next.pem"), &dir.join("ca-next-key.pem"))?.map(Arc::new);
        let previous = std::fs::read_to_string(dir.join("ca-previous.pem")).unwrap_or_default();
        Ok(Arc::new(Authority {
            dir: dir.to_path_buf(),
            roots: ArcSwap::from_pointee(build(signing, next, previous)?),
            changing: Mutex::new(()),
        }))
    }

    /// The root that signs SVIDs now.
    pub fn signing(&self) -> Arc<Root> {
        self.roots.load().signing.clone()
    }

    /// Every root a peer's certificate may chain to (PEM).
    pub fn bundle_pem(&self) -> String {
        let r = self.roots.load();
        bundle_of(&r.signing, r.next.as_deref(), &r.previous)
    }

    /// `staged` (a next root is trusted, not yet signing), `rolled` (retired roots still
    /// trusted), or `steady`.
    pub fn phase(&self) -> &'static str {
        let r = self.roots.load();
        match (&r.next, r.previous.is_empty()) {
            (Some(_), _) => "staged",
            (None, false) => "rolled",
            (None, true) => "steady",
        }
    }

    /// A client-certificate verifier that follows the bundle.
    pub fn client_verifier(self: &Arc<Self>) -> Arc<dyn ClientCertVerifier> {
        let me = self.clone();
        agentmesh_control_api::verify::Following::new(
            move || Ok(me.roots.load().verifier.clone()),
            false,
        )
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs one step of a rollover (`stage`, `activate`, `retire`).
    pub fn rollover(&self, step: &str) -> Result<(), String> {
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.roots.load_full();
        let next = match step {
            "stage" => {
                if r.next.is_some() {
                    return Err("a next root is already staged: activate it first".into());
                }
                let n = Root::create(&self.file("ca-next.pem"), &self.file("ca-next-key.pem"))?;
                build(r.signing.clone(), Some(Arc::new(n)), r.previous.clone())?
            }
            "activate" => {
                let n = r.next.clone().ok_or("no root is staged: stage one first")?;
                let previous = format!("{}{}", r.previous, r.signing.cert_pem);
                write_atomically(&self.file("ca-previous.pem"), previous.as_bytes())
                    .map_err(|e| e.to_string())?;
                // The staged files become the signing ones (the key stays owner-only).
                for (from, to) in [("ca-next-key.pem", "ca-key.pem"), ("ca-next.pem", "ca.pem")] {
                    std::fs::rename(self.file(from), self.file(to))
                        .map_err(|e| format!("cannot move {from} to {to}: {e}"))?;
                }
                build(n, None, previous)?
            }
            "retire" => {
                if r.next.is_some() {
                    return Err("a root is staged: activate it before retiring the old one".into());
                }
                let _ = std::fs::remove_file(self.file("ca-previous.pem"));
                build(r.signing.clone(), None, String::new())?
            }
            other => return Err(format!("unknown step `{other}`: stage, activate or retire")),
        };
        self.roots.store(Arc::new(next));
        tracing::info!(step, phase = self.phase(), "root rollover");
        Ok(())
    }
}

/// The API's serving certificate, issued again by the signing root whenever it changes.
pub struct ServingCert {
    pub authority: Arc<Authority>,
    pub names: Vec<String>,
    held: Mutex<Option<(String, Arc<rustls::sign::CertifiedKey>)>>,
}

impl ServingCert {
    pub fn new(authority: Arc<Authority>, names: Vec<String>) -> Arc<ServingCert> {
        Arc::new(ServingCert {
            authority,
            names,
            held: Mutex::new(None),
        })
    }
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let root = self.authority.signing();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pem, key)) = held.as_ref() {
            if *pem == root.cert_pem {
                return Some(key.clone());
            }
        }
        match root.serving_key(&self.names) {
            Ok(key) => {
                *held = Some((root.cert_pem.clone(), key.clone()));
                Some(key)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot issue the API's certificate");
                None
            }
        }
    }
}
