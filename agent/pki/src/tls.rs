//! rustls configurations for Flotilla's connections: every one trusts the fleet CA (or an
//! operator's own) alone, never the system store, and runs on `ring`, passed explicitly.

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::{Identity, PkiError, Result};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Make `ring` the process's default provider, for clients built without a configuration of
/// ours (reqwest's `Client::new()`, webhooks to public HTTPS). Idempotent.
pub fn install_default_provider() {
    let _ = ring::default_provider().install_default();
}

/// Every certificate of a PEM bundle, as DER.
pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| PkiError(format!("reading PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError("no certificate in the PEM".into()));
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError(format!("reading a PEM private key: {e}")))
}

/// The certificates of `ca_pem` as the only roots of trust.
pub fn roots(ca_pem: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(|e| PkiError(format!("a CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Whether a server asks its clients for certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate the CA issued (the MQTT broker).
    Required,
    /// A client may present one; the application decides what it may do without (the HTTP
    /// API, where the CLI comes with a token and devices with their certificate).
    Optional,
    None,
}

/// A server configuration presenting `identity`, verifying clients against `client_ca`.
pub fn server_config(identity: &Identity, client_ca: Option<&str>, auth: ClientAuth) -> Result<ServerConfig> {
    let err = |e: rustls::Error| PkiError(format!("TLS server configuration: {e}"));
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(err)?;
    let builder = match (auth, client_ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => return Err(PkiError("verifying client certificates needs a client CA".into())),
        (auth, Some(ca)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
            let verifier = if auth == ClientAuth::Optional { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| PkiError(format!("{e}")))?)
        }
    };
    builder.with_single_cert(certs(&identity.cert_pem)?, key(&identity.key_pem)?).map_err(err)
}

/// A client configuration trusting `ca_pem` alone, presenting `identity` when given.
pub fn client_config(ca_pem: &str, identity: Option<&Identity>) -> Result<ClientConfig> {
    client_config_with_clock(ca_pem, identity, None)
}

/// As [`client_config`], judging the server certificate's validity at the later of the system
/// clock and `floor` (Unix seconds, kept current by the caller): a board without a real-time
/// clock boots in 1970, before any certificate's start, until it has seen a trusted time.
pub fn client_config_with_clock(
    ca_pem: &str,
    identity: Option<&Identity>,
    floor: Option<Arc<AtomicU64>>,
) -> Result<ClientConfig> {
    let err = |e: rustls::Error| PkiError(format!("TLS client configuration: {e}"));
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(err)?;
    let builder = match floor {
        None => builder.with_root_certificates(roots(ca_pem)?),
        Some(floor) => {
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
                .build()
                .map_err(|e| PkiError(format!("{e}")))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(FlooredClock { inner, floor }))
        }
    };
    match identity {
        Some(id) => builder.with_client_auth_cert(certs(&id.cert_pem)?, key(&id.key_pem)?).map_err(err),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The webpki server verifier, with "now" never earlier than a trusted floor.
#[derive(Debug)]
struct FlooredClock {
    inner: Arc<WebPkiServerVerifier>,
    floor: Arc<AtomicU64>,
}

impl ServerCertVerifier for FlooredClock {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let floor = self.floor.load(Ordering::Relaxed);
        let now =
            if floor > now.as_secs() { UnixTime::since_unix_epoch(std::time::Duration::from_secs(floor)) } else { now };
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ca;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    /// A whole handshake in memory: the server's verdict, and the client certificate's CN as
    /// the server saw it.
    fn handshake(
        server: ServerConfig,
        client: ClientConfig,
        name: &str,
    ) -> std::result::Result<Option<String>, String> {
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        let mut c = ClientConnection::new(Arc::new(client), ServerName::try_from(name.to_string()).unwrap()).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().map_err(|e| format!("client: {e}"))?;
            if !s.is_handshaking() && !c.is_handshaking() {
                let peer = s.peer_certificates().and_then(|c| c.first()).map(|d| crate::CertInfo::from_der(d).unwrap());
                return Ok(peer.and_then(|p| p.common_name));
            }
        }
        Err("no end to the handshake".into())
    }

    #[test]
    fn mutual_tls_admits_the_fleets_devices_only() {
        let ca = Ca::generate("fleet", now(), 86_400).unwrap();
        let server = ca.server(&["localhost".into(), "127.0.0.1".into()], now(), 86_400).unwrap();
        let device = ca.device("dev-a", now(), 86_400).unwrap();
        let broker = || server_config(&server, Some(ca.cert_pem()), ClientAuth::Required).unwrap();

        // The CA's device, by name or address: its certificate names it.
        let as_device = client_config(ca.cert_pem(), Some(&device)).unwrap();
        assert_eq!(handshake(broker(), as_device.clone(), "localhost"), Ok(Some("dev-a".into())));
        assert_eq!(handshake(broker(), as_device.clone(), "127.0.0.1"), Ok(Some("dev-a".into())));
        // A name the server's certificate does not carry.
        assert!(handshake(broker(), as_device, "fleet.example").unwrap_err().contains("client:"));
        // No certificate, or one from another CA: refused where required, anonymous where optional.
        let anonymous = client_config(ca.cert_pem(), None).unwrap();
        assert!(handshake(broker(), anonymous.clone(), "localhost").unwrap_err().contains("server:"));
        let api = server_config(&server, Some(ca.cert_pem()), ClientAuth::Optional).unwrap();
        assert_eq!(handshake(api, anonymous, "localhost"), Ok(None));
        let other = Ca::generate("another fleet", now(), 86_400).unwrap();
        let stranger = client_config(ca.cert_pem(), Some(&other.device("dev-a", now(), 86_400).unwrap())).unwrap();
        assert!(handshake(broker(), stranger, "localhost").unwrap_err().contains("server:"));
        // Expired: issued two days ago for a day.
        let expired = ca.device("dev-a", now() - 2 * 86_400, 86_400).unwrap();
        let late = client_config(ca.cert_pem(), Some(&expired)).unwrap();
        assert!(handshake(broker(), late, "localhost").unwrap_err().contains("server:"));
        // A trusted-time floor below the system clock changes nothing; one above it is "now" (a
        // board without a clock judges by the newest signed time it saw): past the end, refused.
        let server_1970 = || server_config(&server, Some(ca.cert_pem()), ClientAuth::Required).unwrap();
        let floor = Arc::new(AtomicU64::new(0));
        let rtc_less = client_config_with_clock(ca.cert_pem(), Some(&device), Some(floor.clone())).unwrap();
        assert_eq!(handshake(server_1970(), rtc_less.clone(), "localhost"), Ok(Some("dev-a".into())));
        floor.store((now() + 400 * 86_400) as u64, Ordering::Relaxed);
        assert!(handshake(server_1970(), rtc_less, "localhost").unwrap_err().contains("client:"));
        // A client that trusts another CA refuses the server.
        let wary = client_config(other.cert_pem(), Some(&device)).unwrap();
        assert!(handshake(broker(), wary, "localhost").unwrap_err().contains("client:"));
    }
}
