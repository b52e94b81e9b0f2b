//! The embedded MQTT broker (rmqtt, in-process) with Flotilla's authentication and topic ACL.
//!
//! Chosen over rumqttd after measuring both on this machine (ARCHITECTURE.md, "Broker"): rmqtt
//! held 10,000 devices with every message delivered and exposes authentication and ACL hooks;
//! rumqttd's hooks could not stop one device publishing on another's topics.
//!
//! Rules: the control plane's own client (a random secret per start) may do anything. Every
//! other client is a device that may publish and subscribe only under `{prefix}/d/{its id}/`.
//!
//! With TLS (the default) devices reach rmqtt only through a mutual-TLS front this module runs
//! on the public address: it verifies the client certificate against the fleet CA, refuses
//! revoked devices, and hands the decrypted stream to rmqtt in this process (one open file per
//! device), noting which device the connection carries under a synthetic address no real client
//! can have ([`tls_front`]). The certificate IS the identity: a relayed
//! client must use its certificate's device id as its client id (and as its username, if it
//! sends one), whatever it claims. Only the control plane's own client, with its per-start
//! secret, connects to the loopback listener directly. (rmqtt's own TLS listener needs
//! aws-lc-rs and hands hooks no certificate facts; the front keeps the build on ring and the
//! identity in our hands.)
//!
//! Without TLS (`--insecure-plaintext`), devices connect to rmqtt directly: the client id must
//! equal the username, and when the registry holds a password for the device it must match.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;

use anyhow::Context as _;
use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Messages the broker queues per session before it drops: sized for the control plane's own
/// session to hold a burst from a fleet of 20,000 devices (10 messages each).
const MAX_QUEUED: usize = 200_000;

/// Who may connect, and as what.
#[derive(Debug)]
pub struct BrokerAuth {
    pub server_username: String,
    server_password: String,
    prefix: String,
    /// Device id → hex SHA-256 of its password. Devices without an entry are admitted
    /// (open enrollment) unless `require_device_password` is set.
    device_passwords: RwLock<HashMap<String, String>>,
    pub require_device_password: bool,
    /// Devices must come through the mutual-TLS front with a certificate.
    pub certificates: bool,
    /// Relayed connections by their source address on the loopback: who they are.
    relayed: Mutex<HashMap<SocketAddr, Relayed>>,
    revoked_devices: RwLock<HashSet<String>>,
    revoked_serials: RwLock<HashSet<String>>,
}

#[derive(Debug)]
struct Relayed {
    device: String,
    cut: tokio_util::sync::CancellationToken,
}

impl BrokerAuth {
    pub fn new(prefix: &str, server_password: String) -> Self {
        BrokerAuth {
            server_username: flotilla_proto::SERVER_IDENTITY.into(),
            server_password,
            prefix: prefix.trim_end_matches('/').into(),
            device_passwords: RwLock::new(HashMap::new()),
            require_device_password: false,
            certificates: false,
            relayed: Mutex::new(HashMap::new()),
            revoked_devices: RwLock::new(HashSet::new()),
            revoked_serials: RwLock::new(HashSet::new()),
        }
    }

    /// Refuse `device`'s certificates from now on and cut its live connections (how many).
    pub fn revoke_device(&self, device: &str) -> usize {
        self.revoked_devices.write().expect("auth lock").insert(device.into());
        let relayed = self.relayed.lock().expect("relay lock");
        let live: Vec<_> = relayed.values().filter(|r| r.device == device).collect();
        live.iter().for_each(|r| r.cut.cancel());
        live.len()
    }

    /// Admit `device` again (re-enrolled); certificates revoked one by one stay refused.
    pub fn unrevoke_device(&self, device: &str) {
        self.revoked_devices.write().expect("auth lock").remove(device);
    }

    pub fn revoke_serial(&self, serial: &str) {
        self.revoked_serials.write().expect("auth lock").insert(serial.into());
    }

    /// Whether the front may relay a client with this certificate.
    pub fn admit(&self, cert: &crate::tls::ClientCert) -> Result<(), String> {
        if !flotilla_proto::valid_device_id(&cert.device) {
            return Err(format!("certificate for {:?}, which is not a device id", cert.device));
        }
        if self.revoked_devices.read().expect("auth lock").contains(&cert.device) {
            return Err(format!("device {} is revoked", cert.device));
        }
        if self.revoked_serials.read().expect("auth lock").contains(&cert.serial) {
            return Err(format!("certificate {} of {} is revoked", cert.serial, cert.device));
        }
        Ok(())
    }

    /// The device a relayed connection from `source` carries, if it is one.
    fn relayed_device(&self, source: Option<SocketAddr>) -> Option<String> {
        let source = source?;
        self.relayed.lock().expect("relay lock").get(&source).map(|r| r.device.clone())
    }

    /// How many device connections the TLS front relays now.
    pub fn relayed_connections(&self) -> usize {
        self.relayed.lock().expect("relay lock").len()
    }

    pub fn server_password(&self) -> &str {
        &self.server_password
    }

    pub fn set_device_password(&self, device: &str, password_sha256: String) {
        self.device_passwords.write().expect("auth lock").insert(device.into(), password_sha256);
    }

    pub fn remove_device_password(&self, device: &str) {
        self.device_passwords.write().expect("auth lock").remove(device);
    }

    /// Some(superuser) to admit, None to refuse. `certified`: the device id of the certificate
    /// a relayed connection presented.
    fn authenticate(&self, client_id: &str, username: &str, password: &[u8], certified: Option<&str>) -> Option<bool> {
        if let Some(device) = certified {
            // The certificate says who it is; the claims must agree with it.
            let agrees = client_id == device && (username.is_empty() || username == device);
            return agrees.then_some(false);
        }
        if username == self.server_username {
            return constant_time_eq(password, self.server_password.as_bytes()).then_some(true);
        }
        if self.certificates {
            // Around the front, only the control plane itself.
            return None;
        }
        // A device: its id is its client id and its username, and never a name the control plane
        // keeps for itself (`valid_device_id`), so no device can take the server's session.
        if client_id != username || !flotilla_proto::valid_device_id(username) {
            return None;
        }
        match self.device_passwords.read().expect("auth lock").get(username) {
            Some(want) => {
                constant_time_eq(hex::encode(Sha256::digest(password)).as_bytes(), want.as_bytes()).then_some(false)
            }
            None if self.require_device_password => None,
            None => Some(false),
        }
    }

    fn device_may_use(&self, username: &str, topic: &str) -> bool {
        topic
            .strip_prefix(&self.prefix)
            .and_then(|t| t.strip_prefix("/d/"))
            .and_then(|t| t.strip_prefix(username))
            .is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains(['+', '#']) && !rest[1..].is_empty())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Hooks(Arc<BrokerAuth>);

#[async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(ci) => {
                let user = ci.username().map(|u| &**u).unwrap_or("");
                let pass = ci.password().map(|p| p.as_ref()).unwrap_or(b"");
                let certified = self.0.relayed_device(ci.id().remote_addr);
                let res = match self.0.authenticate(ci.client_id(), user, pass, certified.as_deref()) {
                    Some(superuser) => AuthResult::Allow(superuser, None),
                    None => {
                        tracing::warn!(client = %ci.client_id(), user, certificate = ?certified, "broker refused a connection");
                        AuthResult::BadUsernameOrPassword
                    }
                };
                (false, Some(HookResult::AuthResult(res)))
            }
            // Devices are keyed by client id: authentication made it equal to the username (or
            // to the certificate's device id).
            Parameter::MessagePublishCheckAcl(s, p) => {
                let user = s.id.username_ref();
                let ok = user == self.0.server_username || self.0.device_may_use(&s.id.client_id, &p.topic);
                let r = if ok { PublishAclResult::allow() } else { PublishAclResult::rejected(false, None) };
                (false, Some(HookResult::PublishAclResult(r)))
            }
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let user = s.id.username_ref();
                let ok = user == self.0.server_username || self.0.device_may_use(&s.id.client_id, &sub.topic_filter);
                let r = if ok {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(r)))
            }
            _ => (true, acc),
        }
    }
}

/// A running embedded broker. It runs on a runtime of its own, so stopping it ends every task
/// it spawned: the listener and each client's connection (rmqtt spawns one task per
/// connection, which aborting its server task alone would leave serving).
pub struct EmbeddedBroker {
    /// Where devices connect (the TLS front, or rmqtt itself without TLS).
    pub addr: SocketAddr,
    /// Where the control plane's own client connects (rmqtt's listener).
    pub internal: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl EmbeddedBroker {
    /// Start rmqtt; with `tls`, on the loopback behind a mutual-TLS front on `addr`.
    pub async fn start(
        addr: SocketAddr,
        auth: Arc<BrokerAuth>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<EmbeddedBroker> {
        let rmqtt_addr = if tls.is_some() { SocketAddr::from(([127, 0, 0, 1], 0)) } else { addr };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("flotilla-mqtt")
            .enable_all()
            .build()
            .context("starting the embedded broker's runtime")?;
        let started = rt.spawn(async move {
            // rmqtt refuses connections when the host is busy (CPU > 90 %); a fleet server shares
            // its host with builds and tests, so load shedding is off until it is made a setting.
            let scx = ServerContext::new().busy_check_enable(false).build().await;
            let reg = scx.extends.hook_mgr().register();
            reg.add(Type::ClientAuthenticate, Box::new(Hooks(auth.clone()))).await;
            reg.add(Type::MessagePublishCheckAcl, Box::new(Hooks(auth.clone()))).await;
            reg.add(Type::ClientSubscribeCheckAcl, Box::new(Hooks(auth.clone()))).await;
            reg.start().await;
            let listener = Builder::new()
                .name("external/tcp")
                .laddr(rmqtt_addr)
                .allow_anonymous(false)
                .max_connections(100_000)
                .max_handshaking_limit(10_000)
                .backlog(4096)
                .reuseaddr(Some(true))
                .max_packet_size((flotilla_proto::MAX_PAYLOAD + 64 * 1024) as u32)
                // Per session. The control plane's own session takes the whole fleet's traffic:
                // a burst from every device at once (all reconnecting, a report period lining
                // up) must queue, not be dropped (measured: 10,000 lost a third of a 32,000
                // message burst from 1,000 devices). Devices only ever receive the server's
                // few commands, so the bound that matters for them is issue 18's byte bound.
                .max_inflight(std::num::NonZeroU16::new(1000).expect("non-zero"))
                .max_mqueue_len(MAX_QUEUED)
                .bind()
                .with_context(|| format!("binding the MQTT broker on {rmqtt_addr}"))?
                .tcp()?;
            let internal = listener.local_addr()?;
            let server = MqttServer::new(scx.clone()).listener_by_id(listener, DEVICE_LISTENER).build();
            tokio::spawn(async move {
                if let Err(e) = server.run().await {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            });
            let public = match tls {
                Some(config) => {
                    let front = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the MQTT broker on {addr}"))?;
                    let public = front.local_addr()?;
                    tokio::spawn(tls_front(front, config, scx, auth));
                    public
                }
                None => internal,
            };
            anyhow::Ok((public, internal))
        });
        let (addr, internal) = match started.await {
            Ok(Ok(addrs)) => addrs,
            failed => {
                // A runtime may not be dropped (blocking) inside an async context.
                rt.shutdown_background();
                match failed {
                    Ok(Err(e)) => return Err(e),
                    _ => anyhow::bail!("the embedded broker failed to start"),
                }
            }
        };
        tracing::info!(%addr, "embedded MQTT broker listening");
        Ok(EmbeddedBroker { addr, internal, rt: Some(rt) })
    }

    /// Close the listener and every client connection.
    pub fn stop(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The mutual-TLS front: verify each client's certificate, then hand the decrypted stream to
/// rmqtt in this process (`rmqtt::server::serve_stream`, a two-line patch of ours, see
/// `third_party/README.md`) as a connection of the loopback listener, with the device's identity
/// noted under the connection's address. One open file per device: a relay over loopback TCP
/// held three (the device's socket and both ends of the relay), which capped a process allowed
/// 20,000 files at about 6,600 devices.
///
/// The address rmqtt sees is a synthetic one, `0.A.B.C:P` (0.0.0.0/8 is never a source on the
/// wire), unique per connection: no real client, the control plane's own included, can share
/// it and be taken for a device.
async fn tls_front(
    front: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    scx: ServerContext,
    auth: Arc<BrokerAuth>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut serial: u64 = 0;
    loop {
        let (sock, peer) = match front.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        serial = serial.wrapping_add(1);
        let source = synthetic_address(serial);
        let (acceptor, auth, scx) = (acceptor.clone(), auth.clone(), scx.clone());
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let (tls, cert) = match crate::tls::accept(&acceptor, sock).await {
                Ok(x) => x,
                Err(e) => return tracing::info!(%peer, error = %e, "MQTT: refused a TLS client"),
            };
            if let Err(e) = auth.admit(&cert) {
                return tracing::warn!(%peer, error = %e, "MQTT: refused a device certificate");
            }
            let cut = tokio_util::sync::CancellationToken::new();
            auth.relayed
                .lock()
                .expect("relay lock")
                .insert(source, Relayed { device: cert.device.clone(), cut: cut.clone() });
            // A cut (revocation) ends the stream under rmqtt, which then sees a disconnect as
            // from the network and runs its usual end (the device's will, its session).
            let io = Cuttable { inner: tls, cut: Box::pin(cut.cancelled_owned()) };
            if let Err(e) = rmqtt::server::serve_stream(scx, io, source, DEVICE_LISTENER).await {
                tracing::debug!(%peer, device = %cert.device, error = %e, "MQTT connection ended");
            }
            auth.relayed.lock().expect("relay lock").remove(&source);
        });
    }
}

/// A stream that ends (reads: end of file; writes: broken pipe) once `cut` fires, waking a
/// reader that waits on the idle stream.
struct Cuttable<S> {
    inner: S,
    cut: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<S> Cuttable<S> {
    fn is_cut(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.cut.as_mut().poll(cx).is_ready()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cuttable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.is_cut(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The listener id device connections are served as (the loopback listener's settings).
const DEVICE_LISTENER: rmqtt::types::ListenerId = 1;

/// `0.A.B.C:P` for connection number `n` (40 bits of it).
fn synthetic_address(n: u64) -> SocketAddr {
    let b = n.to_be_bytes();
    SocketAddr::from(([0, b[3], b[4], b[5]], u16::from_be_bytes([b[6], b[7]])))
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_confines_devices_to_their_tree() {
        let a = BrokerAuth::new("flotilla/v1", "s3cret".into());
        assert!(a.device_may_use("dev-1", "flotilla/v1/d/dev-1/hello"));
        assert!(a.device_may_use("dev-1", "flotilla/v1/d/dev-1/cmd"));
        assert!(!a.device_may_use("dev-1", "flotilla/v1/d/dev-10/cmd"));
        assert!(!a.device_may_use("dev-1", "flotilla/v1/d/dev-2/cmd"));
        assert!(!a.device_may_use("dev-1", "flotilla/v1/d/+/cmd"));
        assert!(!a.device_may_use("dev-1", "flotilla/v1/d/dev-1/#"));
        assert!(!a.device_may_use("dev-1", "flotilla/v1/d/dev-1"));
        assert!(!a.device_may_use("dev-1", "other/d/dev-1/cmd"));
    }

    #[test]
    fn authentication_rules() {
        let a = BrokerAuth::new("flotilla/v1", "s3cret".into());
        assert_eq!(a.authenticate("srv", "flotilla-server", b"s3cret", None), Some(true));
        assert_eq!(a.authenticate("srv", "flotilla-server", b"wrong", None), None);
        assert_eq!(a.authenticate("dev-1", "dev-1", b"", None), Some(false));
        assert_eq!(a.authenticate("dev-1", "dev-2", b"", None), None);
        // The control plane's client id, claimed as a device's under open enrollment.
        let server_id = "flotilla-server-0123456789abcdef";
        assert_eq!(a.authenticate(server_id, server_id, b"", None), None);
        assert_eq!(a.authenticate(server_id, "flotilla-server", b"", None), None);
        a.set_device_password("dev-1", hex::encode(Sha256::digest(b"pw")));
        assert_eq!(a.authenticate("dev-1", "dev-1", b"pw", None), Some(false));
        assert_eq!(a.authenticate("dev-1", "dev-1", b"nope", None), None);
    }

    #[test]
    fn with_certificates_the_certificate_is_the_identity() {
        let mut a = BrokerAuth::new("flotilla/v1", "s3cret".into());
        a.certificates = true;
        // A relayed device: client id (and username, if any) must be its certificate's id.
        assert_eq!(a.authenticate("dev-a", "", b"", Some("dev-a")), Some(false));
        assert_eq!(a.authenticate("dev-a", "dev-a", b"", Some("dev-a")), Some(false));
        assert_eq!(a.authenticate("dev-b", "dev-b", b"", Some("dev-a")), None);
        assert_eq!(a.authenticate("dev-a", "dev-b", b"", Some("dev-a")), None);
        // Even the server's name and secret: a relayed connection is a device.
        assert_eq!(a.authenticate("x", "flotilla-server", b"s3cret", Some("dev-a")), None);
        // Around the front: the control plane only; no password or open enrollment for devices.
        assert_eq!(a.authenticate("srv", "flotilla-server", b"s3cret", None), Some(true));
        assert_eq!(a.authenticate("dev-a", "dev-a", b"", None), None);
        a.set_device_password("dev-a", hex::encode(Sha256::digest(b"pw")));
        assert_eq!(a.authenticate("dev-a", "dev-a", b"pw", None), None);
        // Revocation: by device, or one certificate by serial.
        let cert = |d: &str, s: &str| crate::tls::ClientCert { device: d.into(), serial: s.into(), sha256: "".into() };
        assert!(a.admit(&cert("dev-a", "01")).is_ok());
        assert!(a.admit(&cert("flotilla-server-x", "02")).is_err());
        a.revoke_serial("01");
        assert!(a.admit(&cert("dev-a", "01")).unwrap_err().contains("revoked"));
        assert!(a.admit(&cert("dev-a", "03")).is_ok());
        a.revoke_device("dev-a");
        assert!(a.admit(&cert("dev-a", "03")).unwrap_err().contains("revoked"));
        a.unrevoke_device("dev-a");
        assert!(a.admit(&cert("dev-a", "03")).is_ok());
    }
}
