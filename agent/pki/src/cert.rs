//! Keys, CSRs, certificates, and the facts read back from them.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use sha2::{Digest, Sha256};

use crate::{PkiError, Result};

/// A certificate (PEM, leaf first) and its private key (PKCS#8 PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("cert_pem", &self.cert_pem).field("key_pem", &"<set>").finish()
    }
}

/// A fresh ECDSA P-256 private key, PKCS#8 PEM.
pub fn new_key() -> Result<String> {
    Ok(KeyPair::generate().map_err(PkiError::new)?.serialize_pem())
}

/// A certificate signing request for `key_pem` whose subject CN is `device_id`.
pub fn csr(device_id: &str, key_pem: &str) -> Result<String> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError(format!("the device key: {e}")))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = common_name(device_id);
    p.serialize_request(&key).and_then(|r| r.pem()).map_err(PkiError::new)
}

fn common_name(cn: &str) -> DistinguishedName {
    // CertificateParams::default() carries the CN "rcgen self signed cert": always replace it.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// What a certificate says, as far as Flotilla cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: Option<String>,
    /// Validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Hex serial number.
    pub serial: String,
    /// Hex SHA-256 of the DER: the certificate's fingerprint.
    pub sha256: String,
    pub is_ca: bool,
    /// Subject alternative names: DNS names and IP addresses, as text.
    pub names: Vec<String>,
    /// SHA-256 of the SubjectPublicKeyInfo (what browsers pin a key by).
    pub spki_sha256: Vec<u8>,
}

impl CertInfo {
    pub fn from_der(der: &[u8]) -> Result<CertInfo> {
        let (_, c) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError(format!("not a certificate: {e}")))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = c.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => names.push(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes")).to_string()),
                        16 => {
                            names.push(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes")).to_string())
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            common_name: c.subject().iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_owned),
            not_before: c.validity().not_before.timestamp(),
            not_after: c.validity().not_after.timestamp(),
            serial: c.raw_serial_as_string().replace(':', ""),
            sha256: hex::encode(Sha256::digest(der)),
            is_ca: c.is_ca(),
            names,
            spki_sha256: Sha256::digest(c.tbs_certificate.subject_pki.raw).to_vec(),
        })
    }
}

/// Every certificate of a PEM bundle, in order.
pub fn parse_certs(pem: &str) -> Result<Vec<CertInfo>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| PkiError(format!("reading PEM certificates: {e}")))?;
    if ders.is_empty() {
        return Err(PkiError("no certificate in the PEM".into()));
    }
    ders.iter().map(|d| CertInfo::from_der(d)).collect()
}

/// The first certificate of a PEM bundle (the leaf of a chain).
pub fn parse_cert(pem: &str) -> Result<CertInfo> {
    Ok(parse_certs(pem)?.remove(0))
}

#[cfg(feature = "ca")]
pub use authority::Ca;

#[cfg(feature = "ca")]
mod authority {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, DnValue, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };

    use super::{Identity, common_name};
    use crate::{PkiError, Result};

    /// Certificates may start this much before the issuing clock's now (devices' clocks lag).
    const BACKDATE_SECS: i64 = 300;

    /// The fleet CA: it may issue leaf certificates only (path length 0).
    pub struct Ca {
        issuer: Issuer<'static, KeyPair>,
        cert_pem: String,
        key_pem: String,
    }

    impl std::fmt::Debug for Ca {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Ca").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
        }
    }

    fn validity(p: &mut CertificateParams, now: i64, lifetime_secs: i64) -> Result<()> {
        let at = |t: i64| time::OffsetDateTime::from_unix_timestamp(t).map_err(PkiError::new);
        p.not_before = at(now - BACKDATE_SECS)?;
        p.not_after = at(now.saturating_add(lifetime_secs))?;
        Ok(())
    }

    fn serial() -> Result<SerialNumber> {
        // Random: rcgen's default is a digest of the public key, the same for every renewal
        // with the same key.
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(PkiError::new)?;
        b[0] &= 0x7f; // a positive INTEGER
        Ok(SerialNumber::from_slice(&b))
    }

    fn leaf(cn: &str, usage: ExtendedKeyUsagePurpose, now: i64, lifetime_secs: i64) -> Result<CertificateParams> {
        let mut p = CertificateParams::default();
        p.distinguished_name = common_name(cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(serial()?);
        validity(&mut p, now, lifetime_secs)?;
        Ok(p)
    }

    impl Ca {
        /// A new CA named `name`, valid from `now` (Unix seconds) for `lifetime_secs`.
        pub fn generate(name: &str, now: i64, lifetime_secs: i64) -> Result<Ca> {
            let key = KeyPair::generate().map_err(PkiError::new)?;
            let mut p = CertificateParams::default();
            p.distinguished_name = common_name(name);
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            p.serial_number = Some(serial()?);
            validity(&mut p, now, lifetime_secs)?;
            let cert = p.self_signed(&key).map_err(PkiError::new)?;
            let key_pem = key.serialize_pem();
            Ok(Ca { issuer: Issuer::new(p, key), cert_pem: cert.pem(), key_pem })
        }

        /// The CA from its certificate and key (PEM), as [`Ca::cert_pem`] and [`Ca::key_pem`]
        /// wrote them, or an operator's own.
        pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca> {
            let info = super::parse_cert(cert_pem)?;
            if !info.is_ca {
                return Err(PkiError("the certificate is not a CA's (no basicConstraints CA:TRUE)".into()));
            }
            let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError(format!("the CA key: {e}")))?;
            let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| PkiError(format!("the CA: {e}")))?;
            Ok(Ca { issuer, cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string() })
        }

        pub fn cert_pem(&self) -> &str {
            &self.cert_pem
        }

        pub fn key_pem(&self) -> &str {
            &self.key_pem
        }

        /// A server certificate for `names` (DNS names or IP addresses; the first is also the
        /// CN), with a fresh key.
        pub fn server(&self, names: &[String], now: i64, lifetime_secs: i64) -> Result<Identity> {
            let first = names.first().ok_or_else(|| PkiError("a server certificate needs a name".into()))?;
            let mut p = leaf(first, ExtendedKeyUsagePurpose::ServerAuth, now, lifetime_secs)?;
            for n in names {
                p.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => {
                        SanType::DnsName(n.as_str().try_into().map_err(|e| PkiError(format!("name {n:?}: {e}")))?)
                    }
                });
            }
            let key = KeyPair::generate().map_err(PkiError::new)?;
            let cert = p.signed_by(&key, &self.issuer).map_err(PkiError::new)?;
            Ok(Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
        }

        /// A device certificate (CN = `device_id`, client authentication) with a key made here:
        /// for images personalised on a build machine.
        pub fn device(&self, device_id: &str, now: i64, lifetime_secs: i64) -> Result<Identity> {
            let key = KeyPair::generate().map_err(PkiError::new)?;
            let p = leaf(device_id, ExtendedKeyUsagePurpose::ClientAuth, now, lifetime_secs)?;
            let cert = p.signed_by(&key, &self.issuer).map_err(PkiError::new)?;
            Ok(Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
        }

        /// Sign a device's CSR: its signature must verify and its CN must be `device_id`. Of
        /// the request only the public key is used; name, usages and lifetime are the CA's.
        pub fn sign_csr(&self, csr_pem: &str, device_id: &str, now: i64, lifetime_secs: i64) -> Result<String> {
            let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
                .map_err(|e| PkiError(format!("the certificate request: {e}")))?;
            let asked = csr.params.distinguished_name.get(&DnType::CommonName);
            let asked = match asked {
                Some(DnValue::Utf8String(s)) => Some(s.as_str()),
                Some(DnValue::PrintableString(s)) => Some(s.as_str()),
                _ => None,
            };
            if asked != Some(device_id) {
                return Err(PkiError(format!("the certificate request names {asked:?}, not the device {device_id:?}")));
            }
            csr.params = leaf(device_id, ExtendedKeyUsagePurpose::ClientAuth, now, lifetime_secs)?;
            Ok(csr.signed_by(&self.issuer).map_err(PkiError::new)?.pem())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    #[test]
    fn a_ca_issues_server_and_device_certificates_and_signs_requests() {
        let ca = Ca::generate("Flotilla fleet CA", NOW, 3650 * DAY).unwrap();
        let info = parse_cert(ca.cert_pem()).unwrap();
        assert!(info.is_ca);
        assert_eq!(info.common_name.as_deref(), Some("Flotilla fleet CA"));
        assert_eq!((info.not_before, info.not_after), (NOW - 300, NOW + 3650 * DAY));

        let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        let server = ca.server(&names, NOW, 365 * DAY).unwrap();
        let s = parse_cert(&server.cert_pem).unwrap();
        assert_eq!((s.common_name.as_deref(), s.is_ca), (Some("localhost"), false));
        assert_eq!(s.names, names);

        // A device's own key and request: only its public key is used.
        let key = new_key().unwrap();
        let request = csr("rpi-7", &key).unwrap();
        let cert = ca.sign_csr(&request, "rpi-7", NOW, 90 * DAY).unwrap();
        let d = parse_cert(&cert).unwrap();
        assert_eq!((d.common_name.as_deref(), d.not_after), (Some("rpi-7"), NOW + 90 * DAY));
        // A request for another name is refused, and so is one that is not a request.
        assert!(ca.sign_csr(&request, "rpi-8", NOW, DAY).unwrap_err().to_string().contains("\"rpi-7\""));
        assert!(
            ca.sign_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "x",
                NOW,
                DAY
            )
            .is_err()
        );

        // Renewing with the same key gives another serial.
        let again = parse_cert(&ca.sign_csr(&request, "rpi-7", NOW, 90 * DAY).unwrap()).unwrap();
        assert_ne!(again.serial, d.serial);
        assert_ne!(again.sha256, d.sha256);

        // The CA reloads from its PEM and issues certificates the first one's chain accepts.
        let reloaded = Ca::load(ca.cert_pem(), ca.key_pem()).unwrap();
        let dev = reloaded.device("rpi-9", NOW, DAY).unwrap();
        assert_eq!(parse_cert(&dev.cert_pem).unwrap().common_name.as_deref(), Some("rpi-9"));
        assert!(format!("{dev:?}").contains("<set>") && !format!("{dev:?}").contains("PRIVATE KEY"));
        assert!(Ca::load(&server.cert_pem, &server.key_pem).unwrap_err().to_string().contains("not a CA"));
    }
}
