//! The device's side of the fleet PKI: the fleet CA it pins (for the broker and bundle
//! downloads, never the system store), and its own certificate: flashed into the image, claimed
//! on first boot with a single-use token (the key is made here and never leaves), and renewed
//! over the mutual-TLS session before it ends.
//!
//! The working identity is one file, `DATA_DIR/tls/identity.pem` (certificate then key, mode
//! 0600), so that a renewal swaps both with one rename: a crash leaves the old pair or the new,
//! never a key that does not match its certificate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use flotilla_pki::{CertInfo, Identity};

use crate::AgentConfig;
use crate::blobs::write_atomic;

/// What the agent's TLS connections need.
pub struct DeviceTls {
    /// The pinned fleet CA (None: plain TCP and http:// only).
    ca_pem: Option<String>,
    /// The trusted time (Unix seconds) certificates are judged at when the system clock is
    /// behind it (boards without a real-time clock).
    pub floor: Arc<AtomicU64>,
    identity: RwLock<Option<Identity>>,
    path: PathBuf,
}

impl std::fmt::Debug for DeviceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTls").field("path", &self.path).finish_non_exhaustive()
    }
}

/// `DATA_DIR/tls/identity.pem`.
pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("identity.pem")
}

impl DeviceTls {
    /// The CA, and the identity kept in the data directory, else the flashed one (copied there).
    pub fn load(cfg: &AgentConfig, trusted_now: u64) -> anyhow::Result<DeviceTls> {
        let ca_pem = match &cfg.ca {
            Some(p) => {
                let pem =
                    std::fs::read_to_string(p).with_context(|| format!("reading the fleet CA {}", p.display()))?;
                flotilla_pki::tls::roots(&pem).with_context(|| format!("the fleet CA {}", p.display()))?;
                Some(pem)
            }
            None => None,
        };
        let path = identity_path(&cfg.data_dir);
        let identity = match std::fs::read_to_string(&path) {
            Ok(pem) => Some(split(&pem).with_context(|| format!("the device identity {}", path.display()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match (&cfg.cert, &cfg.key) {
                (Some(c), Some(k)) => {
                    let id = Identity {
                        cert_pem: std::fs::read_to_string(c)
                            .with_context(|| format!("reading cert {}", c.display()))?,
                        key_pem: std::fs::read_to_string(k).with_context(|| format!("reading key {}", k.display()))?,
                    };
                    check(&id, &cfg.device_id)?;
                    save(&path, &id)?;
                    Some(id)
                }
                _ => None,
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if let Some(id) = &identity {
            check(id, &cfg.device_id)?;
        }
        Ok(DeviceTls { ca_pem, floor: Arc::new(AtomicU64::new(trusted_now)), identity: RwLock::new(identity), path })
    }

    pub fn identity(&self) -> Option<Identity> {
        self.identity.read().expect("identity lock").clone()
    }

    /// The current certificate's facts.
    pub fn certificate(&self) -> Option<CertInfo> {
        self.identity().and_then(|id| flotilla_pki::parse_cert(&id.cert_pem).ok())
    }

    /// Keep a new identity: on disk first (one atomic rename), then in use.
    pub fn replace(&self, id: Identity, device_id: &str) -> anyhow::Result<CertInfo> {
        let info = check(&id, device_id)?;
        save(&self.path, &id)?;
        *self.identity.write().expect("identity lock") = Some(id);
        Ok(info)
    }

    /// Judge certificates no earlier than `t` (a trusted time the agent learnt).
    pub fn advance_clock(&self, t: u64) {
        self.floor.fetch_max(t, Ordering::Relaxed);
    }

    /// rustls configuration pinning the fleet CA, presenting the device certificate if asked.
    pub fn client_config(&self, with_identity: bool) -> anyhow::Result<rustls::ClientConfig> {
        let ca = self.ca_pem.as_deref().context("no fleet CA configured (ca = ...)")?;
        let id = if with_identity { self.identity() } else { None };
        if with_identity && id.is_none() {
            bail!("this device has no certificate yet");
        }
        Ok(flotilla_pki::tls::client_config_with_clock(ca, id.as_ref(), Some(self.floor.clone()))?)
    }

    /// An HTTP client for bundle downloads and claims: https against the fleet CA only (plain
    /// http stays possible for a server run with --insecure-plaintext).
    pub fn http_client(&self, read_timeout: std::time::Duration) -> anyhow::Result<reqwest::Client> {
        let b =
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5)).read_timeout(read_timeout);
        let b = match self.ca_pem {
            Some(_) => b.tls_backend_preconfigured(self.client_config(false)?),
            None => b.https_only(false),
        };
        Ok(b.build()?)
    }
}

/// The certificate (chain) and key of one PEM file.
fn split(pem: &str) -> anyhow::Result<Identity> {
    let mut cert = String::new();
    let mut key = String::new();
    let mut into: Option<&mut String> = None;
    for line in pem.lines() {
        if line.starts_with("-----BEGIN ") {
            into = Some(if line.contains("PRIVATE KEY") { &mut key } else { &mut cert });
        }
        if let Some(s) = into.as_deref_mut() {
            s.push_str(line);
            s.push('\n');
        }
        if line.starts_with("-----END ") {
            into = None;
        }
    }
    if cert.is_empty() || key.is_empty() {
        bail!("expected a certificate and a private key");
    }
    Ok(Identity { cert_pem: cert, key_pem: key })
}

fn save(path: &Path, id: &Identity) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    write_atomic(path, format!("{}{}", id.cert_pem, id.key_pem).as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// The identity's certificate names this device, and its key is the certificate's.
fn check(id: &Identity, device_id: &str) -> anyhow::Result<CertInfo> {
    let info = flotilla_pki::parse_cert(&id.cert_pem)?;
    if info.common_name.as_deref() != Some(device_id) {
        bail!(
            "the device certificate is for {:?}, not this device {device_id:?}",
            info.common_name.unwrap_or_default()
        );
    }
    // A key that is not the certificate's fails here, not at every connection attempt.
    flotilla_pki::tls::client_config(&id.cert_pem, Some(id))
        .map_err(|e| anyhow::anyhow!("the device key does not go with its certificate: {e}"))?;
    Ok(info)
}

/// First-boot provisioning: make a key here, send a CSR with the claim token, keep the
/// certificate the control plane signs. The token works once.
pub async fn claim(tls: &DeviceTls, device_id: &str, url: &str, token: &str) -> anyhow::Result<CertInfo> {
    let key = flotilla_pki::new_key()?;
    let csr = flotilla_pki::csr(device_id, &key)?;
    let client = tls.http_client(std::time::Duration::from_secs(30))?;
    let body = serde_json::json!({ "device_id": device_id, "token": token, "csr": csr });
    let url = format!("{}/api/v1/claim", url.trim_end_matches('/'));
    let r = client.post(&url).json(&body).send().await.with_context(|| format!("claiming at {url}"))?;
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(String::from))
            .unwrap_or(text);
        bail!("the control plane refused the claim ({status}): {msg}");
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("the claim's answer")?;
    let cert = v["certificate"].as_str().context("the claim's answer holds no certificate")?;
    tls.replace(Identity { cert_pem: cert.to_string(), key_pem: key }, device_id)
}

/// Whether the certificate should be renewed at `now`: less than `before` seconds left (or a
/// third of its lifetime when not set).
pub fn due(info: &CertInfo, now: u64, before: Option<u64>) -> bool {
    let life = (info.not_after - info.not_before).max(0) as u64;
    let margin = before.unwrap_or(life / 3);
    (info.not_after.max(0) as u64).saturating_sub(now) < margin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_in_the_last_third_or_margin() {
        let info = |nb: i64, na: i64| CertInfo {
            common_name: None,
            not_before: nb,
            not_after: na,
            serial: String::new(),
            sha256: String::new(),
            is_ca: false,
            names: vec![],
            spki_sha256: vec![],
        };
        let c = info(0, 300);
        assert!(!due(&c, 199, None));
        assert!(due(&c, 201, None));
        assert!(due(&c, 400, None));
        assert!(!due(&c, 250, Some(10)));
        assert!(due(&c, 295, Some(10)));
    }

    #[test]
    fn one_file_holds_certificate_and_key() {
        let pem = "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nREVG\n-----END PRIVATE KEY-----\n";
        let id = split(pem).unwrap();
        assert!(id.cert_pem.contains("QUJD") && !id.cert_pem.contains("REVG"));
        assert!(id.key_pem.contains("REVG") && id.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(split("-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n").is_err());
    }
}
