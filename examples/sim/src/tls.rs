//! TLS for simulated devices: a client certificate per device (CN = device id) minted in-process
//! from the fleet CA, and the server pinned by the fleet CA (or an external broker's CA).
//!
//! One webpki verifier is shared by every device's configuration; each device's own
//! configuration holds only its certificate and key (and a tiny resumption cache), so a
//! thousand devices cost little memory.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::ClientConfig;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

/// What TLS connections of the simulator need.
pub struct TlsSetup {
    /// The fleet CA, to mint device certificates (None: devices present no certificate).
    ca: Option<flotilla_pki::Ca>,
    /// The PEM the server (broker, HTTP) is verified against.
    pub roots_pem: String,
    verifier: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    cert_lifetime_secs: i64,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup").field("mints", &self.ca.is_some()).finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// `fleet_ca`: a directory with `ca.pem` and `ca.key`. `ca`: a PEM file to verify the broker
    /// by instead of the fleet CA. None when neither is given.
    pub fn load(fleet_ca: Option<&Path>, ca: Option<&Path>, cert_days: u32) -> anyhow::Result<Option<TlsSetup>> {
        let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let fleet = match fleet_ca {
            Some(dir) => {
                let (cert, key) = (read(&dir.join("ca.pem"))?, read(&dir.join("ca.key"))?);
                Some(
                    flotilla_pki::Ca::load(&cert, &key)
                        .with_context(|| format!("the fleet CA in {} (ca.pem, ca.key)", dir.display()))?,
                )
            }
            None => None,
        };
        let roots_pem = match (ca, &fleet) {
            (Some(p), _) => read(p)?,
            (None, Some(c)) => c.cert_pem().to_string(),
            (None, None) => return Ok(None),
        };
        let provider = flotilla_pki::tls::provider();
        let roots = flotilla_pki::tls::roots(&roots_pem).context("the CA to verify the server by")?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("a certificate verifier")?;
        Ok(Some(TlsSetup {
            ca: fleet,
            roots_pem,
            verifier,
            provider,
            cert_lifetime_secs: cert_days.max(1) as i64 * 86_400,
        }))
    }

    /// Whether device certificates are minted.
    pub fn mints(&self) -> bool {
        self.ca.is_some()
    }

    /// A client configuration for `device_id`: a fresh key and certificate from the fleet CA
    /// (when there is one), the shared verifier.
    pub fn device_config(&self, device_id: &str) -> anyhow::Result<Arc<ClientConfig>> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(self.verifier.clone());
        let mut config = match &self.ca {
            Some(ca) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
                let id = ca.device(device_id, now, self.cert_lifetime_secs)?;
                let certs = flotilla_pki::tls::certs(&id.cert_pem)?;
                let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).context("the minted key")?;
                builder.with_client_auth_cert(certs, key)?
            }
            None => builder.with_no_client_auth(),
        };
        // A reconnect resumes; one session is all a device needs.
        config.resumption = Resumption::in_memory_sessions(2);
        Ok(Arc::new(config))
    }

    /// For HTTP downloads: the server verified, no client certificate.
    pub fn http_config(&self) -> anyhow::Result<ClientConfig> {
        Ok(ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(self.verifier.clone())
            .with_no_client_auth())
    }
}

/// One HTTP client for every device's downloads (https pinned to the CA; http:// allowed).
pub fn http_client(tls: Option<&TlsSetup>) -> anyhow::Result<reqwest::Client> {
    let b = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(30))
        .pool_max_idle_per_host(64);
    let b = match tls {
        Some(t) => b.tls_backend_preconfigured(t.http_config()?),
        None => b,
    };
    Ok(b.build()?)
}
