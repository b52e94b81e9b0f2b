//! The embedded MQTT broker (rmqtt, in-process) with Flotilla's authentication and topic ACL.
//!
//! Chosen over rumqttd after measuring both on this machine (ARCHITECTURE.md, "Broker"): rmqtt
//! held 10,000 devices with every message delivered and exposes authentication and ACL hooks;
//! rumqttd's hooks could not stop one device publishing on another's topics.
//!
//! Rules: the control plane's own client (a random secret per start) may do anything. Every
//! other client is a device: its client id must equal its username, it may publish and
//! subscribe only under `{prefix}/d/{its id}/`, and when the registry holds a password for it,
//! the password must match.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};
use sha2::{Digest, Sha256};

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
}

impl BrokerAuth {
    pub fn new(prefix: &str, server_password: String) -> Self {
        BrokerAuth {
            server_username: flotilla_proto::SERVER_IDENTITY.into(),
            server_password,
            prefix: prefix.trim_end_matches('/').into(),
            device_passwords: RwLock::new(HashMap::new()),
            require_device_password: false,
        }
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

    fn authenticate(&self, client_id: &str, username: &str, password: &[u8]) -> Option<bool> {
        if username == self.server_username {
            return constant_time_eq(password, self.server_password.as_bytes()).then_some(true);
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
                let res = match self.0.authenticate(ci.client_id(), user, pass) {
                    Some(superuser) => AuthResult::Allow(superuser, None),
                    None => {
                        tracing::warn!(client = %ci.client_id(), user, "broker refused a connection");
                        AuthResult::BadUsernameOrPassword
                    }
                };
                (false, Some(HookResult::AuthResult(res)))
            }
            Parameter::MessagePublishCheckAcl(s, p) => {
                let user = s.id.username_ref();
                let ok = user == self.0.server_username || self.0.device_may_use(user, &p.topic);
                let r = if ok { PublishAclResult::allow() } else { PublishAclResult::rejected(false, None) };
                (false, Some(HookResult::PublishAclResult(r)))
            }
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let user = s.id.username_ref();
                let ok = user == self.0.server_username || self.0.device_may_use(user, &sub.topic_filter);
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
    pub addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl EmbeddedBroker {
    pub async fn start(addr: SocketAddr, auth: Arc<BrokerAuth>) -> anyhow::Result<EmbeddedBroker> {
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
            reg.add(Type::ClientSubscribeCheckAcl, Box::new(Hooks(auth))).await;
            reg.start().await;
            let listener = Builder::new()
                .name("external/tcp")
                .laddr(addr)
                .allow_anonymous(false)
                .max_connections(100_000)
                .max_handshaking_limit(10_000)
                .backlog(4096)
                .reuseaddr(Some(true))
                .max_packet_size((flotilla_proto::MAX_PAYLOAD + 64 * 1024) as u32)
                .max_inflight(std::num::NonZeroU16::new(100).expect("non-zero"))
                .max_mqueue_len(10_000)
                .bind()
                .with_context(|| format!("binding the MQTT broker on {addr}"))?
                .tcp()?;
            let addr = listener.local_addr()?;
            tokio::spawn(async move {
                if let Err(e) = MqttServer::new(scx).listener_by_id(listener, 1).build().run().await {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            });
            anyhow::Ok(addr)
        });
        let addr = match started.await {
            Ok(Ok(addr)) => addr,
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
        Ok(EmbeddedBroker { addr, rt: Some(rt) })
    }

    /// Close the listener and every client connection.
    pub fn stop(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
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
        assert_eq!(a.authenticate("srv", "flotilla-server", b"s3cret"), Some(true));
        assert_eq!(a.authenticate("srv", "flotilla-server", b"wrong"), None);
        assert_eq!(a.authenticate("dev-1", "dev-1", b""), Some(false));
        assert_eq!(a.authenticate("dev-1", "dev-2", b""), None);
        // The control plane's client id, claimed as a device's under open enrollment.
        let server_id = "flotilla-server-0123456789abcdef";
        assert_eq!(a.authenticate(server_id, server_id, b""), None);
        assert_eq!(a.authenticate(server_id, "flotilla-server", b""), None);
        a.set_device_password("dev-1", hex::encode(Sha256::digest(b"pw")));
        assert_eq!(a.authenticate("dev-1", "dev-1", b"pw"), Some(false));
        assert_eq!(a.authenticate("dev-1", "dev-1", b"nope"), None);
    }
}
