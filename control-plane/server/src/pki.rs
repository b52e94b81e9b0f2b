//! The control plane's certificates, kept in `DATA_DIR/pki/`:
//!
//! - `ca.pem`, `ca.key`: the **fleet CA**. Made on the first start (like `admin.token`) unless an
//!   operator put their own there (an intermediate of their PKI, say). It issues the server's
//!   certificate and every device's; devices and the CLI pin `ca.pem`.
//! - `server.pem`, `server.key`: the certificate the HTTPS API and the MQTT broker present, for
//!   every name and address the server is reached by. Issued again when a name is missing or
//!   it nears its end, so changing `--http` or `--tls-name` needs nothing else. An operator's
//!   own (`--tls-cert/--tls-key`) is used as given.
//!
//! Device certificates: subject CN = the device id, client authentication only, issued by
//! [`Pki::issue`] (the harness, `flotilla-image personalise` through the API) or by signing a
//! device's CSR ([`Pki::sign`]: claims and renewals, where the key never leaves the device).

use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_pki::{Ca, Identity, parse_cert};

pub const DIR: &str = "pki";
const DAY: i64 = 86_400;
/// The fleet CA lives 20 years: devices pin it.
const CA_LIFETIME: i64 = 20 * 365 * DAY;
const SERVER_LIFETIME: i64 = 365 * DAY;
/// A server certificate this close to its end is issued again at start.
const SERVER_RENEW_BEFORE: i64 = 30 * DAY;
/// Device certificates live a year by default; agents renew a third before the end
/// (`cert_renew_before`), so a device may be offline for four months and still renew itself.
pub const DEFAULT_DEVICE_LIFETIME: i64 = 365 * DAY;

/// How the server's TLS is set up.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// An operator's server certificate chain and key (PEM files) instead of one the fleet CA
    /// issues.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// More CAs whose device certificates the broker accepts (an operator's own device PKI),
    /// besides the fleet CA.
    pub client_ca: Option<PathBuf>,
    /// Names and addresses the server certificate must carry besides localhost, the loopback
    /// addresses, the host name and the addresses it binds.
    pub names: Vec<String>,
}

/// The fleet CA and the server's identity, loaded (or made) at start.
pub struct Pki {
    pub ca: Ca,
    pub ca_path: PathBuf,
    /// What the server presents.
    pub server: Identity,
    /// Every CA whose client certificates are accepted (PEM): the fleet CA and `--client-ca`.
    pub client_ca_pem: String,
    pub device_lifetime: i64,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("ca_path", &self.ca_path).finish_non_exhaustive()
    }
}

impl Pki {
    /// Load the fleet CA and the server certificate from `data_dir/pki`, making what is missing.
    pub fn open(data_dir: &Path, opts: &TlsOptions, names: &[String], now: i64) -> anyhow::Result<Pki> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ca_path, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
        let ca = if ca_key.exists() {
            load_ca(&dir)?
        } else {
            // Replicas sharing a data directory may start at once: the one whose key lands
            // first (a hard link never replaces a file) makes the CA; the others load it.
            let ca = Ca::generate("Flotilla fleet CA", now, CA_LIFETIME)?;
            let tmp = dir.join(format!(".ca-{}.key", crate::util::new_id()));
            write_private(&tmp, ca.key_pem())?;
            let won = std::fs::hard_link(&tmp, &ca_key).is_ok();
            let _ = std::fs::remove_file(&tmp);
            if won {
                write_public(&ca_path, ca.cert_pem())?;
                tracing::info!(path = %ca_path.display(), "created the fleet CA");
                ca
            } else {
                load_ca(&dir)?
            }
        };
        let server = match (&opts.cert, &opts.key) {
            (Some(c), Some(k)) => {
                let id = Identity { cert_pem: read(c)?, key_pem: read(k)? };
                let info = parse_cert(&id.cert_pem).with_context(|| format!("--tls-cert {}", c.display()))?;
                if info.not_after < now {
                    anyhow::bail!(
                        "--tls-cert {} expired at {}",
                        c.display(),
                        crate::util::rfc3339_ms(info.not_after * 1000)
                    );
                }
                id
            }
            (None, None) => server_identity(&ca, &dir, names, now)?,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        let mut client_ca_pem = ca.cert_pem().to_string();
        if let Some(p) = &opts.client_ca {
            let extra = read(p)?;
            flotilla_pki::parse_certs(&extra).with_context(|| format!("--client-ca {}", p.display()))?;
            client_ca_pem.push_str(&extra);
        }
        Ok(Pki { ca, ca_path, server, client_ca_pem, device_lifetime: DEFAULT_DEVICE_LIFETIME })
    }

    /// A device certificate with a key made here (for images personalised off the device).
    pub fn issue(&self, device: &str, now: i64) -> anyhow::Result<Identity> {
        Ok(self.ca.device(device, now, self.device_lifetime)?)
    }

    /// Sign a device's CSR for `device` (the key stays on the device).
    pub fn sign(&self, csr_pem: &str, device: &str, now: i64) -> anyhow::Result<String> {
        Ok(self.ca.sign_csr(csr_pem, device, now, self.device_lifetime)?)
    }
}

/// Device ids a certificate may name: valid, and never one the control plane reserves.
pub fn issuable(device: &str) -> anyhow::Result<()> {
    if flotilla_proto::reserved_id(device) {
        anyhow::bail!("device id {device:?} is reserved for the control plane");
    }
    if !flotilla_proto::valid_device_id(device) {
        anyhow::bail!("device id {device:?} is invalid: use 1-64 chars of [A-Za-z0-9._-]");
    }
    Ok(())
}

/// The fleet CA's server certificate for `names`, reused while it carries them all and is not
/// near its end.
fn server_identity(ca: &Ca, dir: &Path, names: &[String], now: i64) -> anyhow::Result<Identity> {
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    if let (Ok(cert_pem), Ok(key_pem)) = (std::fs::read_to_string(&cert_path), std::fs::read_to_string(&key_path)) {
        let fits = parse_cert(&cert_pem).is_ok_and(|i| {
            let has = |n: &String| i.names.iter().any(|m| same_name(m, n));
            i.not_after - SERVER_RENEW_BEFORE > now && names.iter().all(has)
        });
        // Issued by this CA: a CA replaced by hand means a new server certificate too.
        let ours = flotilla_pki::tls::server_config(
            &Identity { cert_pem: cert_pem.clone(), key_pem: key_pem.clone() },
            None,
            flotilla_pki::tls::ClientAuth::None,
        )
        .is_ok()
            && chains_to(&cert_pem, ca.cert_pem());
        if fits && ours {
            return Ok(Identity { cert_pem, key_pem });
        }
    }
    let id = ca.server(names, now, SERVER_LIFETIME)?;
    write_private(&key_path, &id.key_pem)?;
    write_public(&cert_path, &id.cert_pem)?;
    tracing::info!(names = ?names, "issued the server certificate");
    Ok(id)
}

/// Whether `cert_pem` verifies under `ca_pem` (checked with a client handshake's verifier).
fn chains_to(cert_pem: &str, ca_pem: &str) -> bool {
    use rustls::client::danger::ServerCertVerifier;
    let (Ok(roots), Ok(certs)) = (flotilla_pki::tls::roots(ca_pem), flotilla_pki::tls::certs(cert_pem)) else {
        return false;
    };
    let Ok(verifier) =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), flotilla_pki::tls::provider())
            .build()
    else {
        return false;
    };
    let name = parse_cert(cert_pem).ok().and_then(|i| i.names.first().cloned()).unwrap_or_default();
    let Ok(name) = rustls::pki_types::ServerName::try_from(name) else { return false };
    verifier.verify_server_cert(&certs[0], &certs[1..], &name, &[], rustls::pki_types::UnixTime::now()).is_ok()
}

fn same_name(a: &str, b: &str) -> bool {
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// The names a server certificate should carry: localhost and the loopback addresses, this
/// host's name, every specific address the server binds, and the operator's `extra`.
pub fn server_names(binds: &[std::net::IpAddr], extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h.parse::<std::net::IpAddr>().is_err() {
            names.push(h.to_string());
        }
    }
    names.extend(binds.iter().filter(|ip| !ip.is_unspecified()).map(|ip| ip.to_string()));
    names.extend(extra.iter().cloned());
    let mut seen = Vec::new();
    names.retain(|n| {
        let new = !seen.iter().any(|m: &String| same_name(m, n));
        if new {
            seen.push(n.clone());
        }
        new
    });
    names
}

/// What Mosquitto needs to take the fleet's certificates (`flotilla-server mosquitto`): the
/// fleet CA, a broker certificate for `names` from it, an ACL file confining each device to its
/// own tree (`%u` is the certificate's CN under `use_identity_as_username`), and a listener
/// configuration using them. Returns the configuration's path.
pub fn mosquitto_files(
    data_dir: &Path,
    out: &Path,
    names: &[String],
    prefix: &str,
    listen: &str,
) -> anyhow::Result<PathBuf> {
    let now = crate::util::now_s();
    let p = Pki::open(data_dir, &TlsOptions::default(), &server_names(&[], names), now)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let broker = p.ca.server(&server_names(&[], names), now, SERVER_LIFETIME)?;
    write_public(&out.join("ca.pem"), p.ca.cert_pem())?;
    write_public(&out.join("broker.pem"), &broker.cert_pem)?;
    write_private(&out.join("broker.key"), &broker.key_pem)?;
    let prefix = prefix.trim_end_matches('/');
    let acl = format!(
        "# Written by flotilla-server mosquitto. Usernames are the client certificates' CN\n\
         # (use_identity_as_username): device ids, and {server} for the control plane, a name the\n\
         # fleet CA issues to no device.\n\
         user {server}\ntopic readwrite {prefix}/#\n\n\
         # Every device: its own tree only.\npattern readwrite {prefix}/d/%u/#\n",
        server = flotilla_proto::SERVER_IDENTITY
    );
    write_public(&out.join("flotilla.acl"), &acl)?;
    let (host, port) = listen.rsplit_once(':').with_context(|| format!("--listen {listen:?}: expected HOST:PORT"))?;
    let conf = format!(
        "# Written by flotilla-server mosquitto: mutual TLS with the fleet's certificates.\n\
         per_listener_settings false\nallow_anonymous false\nacl_file {acl}\n\
         listener {port} {host}\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
         require_certificate true\nuse_identity_as_username true\n\n\
         # The control plane's sessions take the whole fleet's traffic (and, subscribing to\n\
         # device state, every device's retained state at once): Mosquitto's defaults (20 in\n\
         # flight, 1000 queued per client) drop most of a burst from a few thousand devices.\n\
         # Devices only receive the control plane's few commands.\n\
         max_inflight_messages 1000\nmax_queued_messages 200000\n",
        acl = out.join("flotilla.acl").display(),
        ca = out.join("ca.pem").display(),
        cert = out.join("broker.pem").display(),
        key = out.join("broker.key").display(),
    );
    let path = out.join("mosquitto.conf");
    write_public(&path, &conf)?;
    Ok(path)
}

/// The fleet CA in `dir` (waiting briefly for a replica that is writing its certificate).
fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    for _ in 0..50 {
        if cert.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let key = read(&key)?;
    let cert = read(&cert).context("the fleet CA's key is there but not its certificate")?;
    Ca::load(&cert, &key).with_context(|| format!("the fleet CA in {}", dir.display()))
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

/// Write a file readable by its owner only, atomically.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    write(path, text, 0o600)
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    write(path, text, 0o644)
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_makes_a_ca_and_a_server_certificate_and_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::util::now_s();
        let names = server_names(&["10.1.2.3".parse().unwrap()], &["fleet.example".into()]);
        assert!(names.contains(&"10.1.2.3".into()) && names.contains(&"localhost".into()), "{names:?}");
        let a = Pki::open(dir.path(), &TlsOptions::default(), &names, now).unwrap();
        let s = parse_cert(&a.server.cert_pem).unwrap();
        assert!(s.names.contains(&"fleet.example".into()) && s.names.contains(&"127.0.0.1".into()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("pki/ca.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The same names: the same certificates.
        let b = Pki::open(dir.path(), &TlsOptions::default(), &names, now).unwrap();
        assert_eq!((a.ca.cert_pem(), &a.server), (b.ca.cert_pem(), &b.server));
        // A new name: the same CA, a new server certificate that carries it.
        let more = server_names(&[], &["other.example".into()]);
        let c = Pki::open(dir.path(), &TlsOptions::default(), &more, now).unwrap();
        assert_eq!(a.ca.cert_pem(), c.ca.cert_pem());
        assert!(parse_cert(&c.server.cert_pem).unwrap().names.contains(&"other.example".into()));
        // Near its end: issued again.
        let later = now + SERVER_LIFETIME - SERVER_RENEW_BEFORE + DAY;
        let d = Pki::open(dir.path(), &TlsOptions::default(), &more, later).unwrap();
        assert_ne!(c.server, d.server);
        // Devices: CN = id, from the fleet CA.
        let dev = a.issue("rpi-1", now).unwrap();
        assert_eq!(parse_cert(&dev.cert_pem).unwrap().common_name.as_deref(), Some("rpi-1"));
        // An operator's own server certificate is used as given; half of one is an error.
        let own = a.ca.server(&["own.example".into()], now, DAY).unwrap();
        std::fs::write(dir.path().join("own.pem"), &own.cert_pem).unwrap();
        std::fs::write(dir.path().join("own.key"), &own.key_pem).unwrap();
        let opts = TlsOptions {
            cert: Some(dir.path().join("own.pem")),
            key: Some(dir.path().join("own.key")),
            ..TlsOptions::default()
        };
        assert_eq!(Pki::open(dir.path(), &opts, &names, now).unwrap().server, own);
        let half = TlsOptions { key: None, ..opts };
        assert!(Pki::open(dir.path(), &half, &names, now).unwrap_err().to_string().contains("go together"));
    }
}
