//! The control plane's connection to the broker, and the [`DeviceBus`] over it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use flotilla_proto::{Channel, Command, Msg, Topics};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, QoS};

use super::broker::BrokerAuth;
use crate::service::{BrokerGate, DeviceBus};
use crate::util::{new_id, now_ms};

pub struct BrokerLogin {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS to an external broker (mqtts://): the CA it trusts and the control plane's client
    /// certificate (CN flotilla-server, which no device certificate can carry).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// `client_id` is stable for a server's data directory: with a persistent session the broker
/// keeps what devices send while the server restarts (events, acknowledgements), and delivers
/// it when the server is back.
/// With `shared` (replicas sharing an external broker), each replica's session is clean: a
/// shared subscription hands each message to one connected member, and a dead replica's
/// persistent session would hold its share back.
pub fn client(login: &BrokerLogin, client_id: &str, shared: bool) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, login.host.clone(), login.port);
    // It also resubscribes on every connect and reads retained state.
    opts.set_clean_session(shared);
    opts.set_keep_alive(Duration::from_secs(30));
    let max = flotilla_proto::MAX_PAYLOAD + 64 * 1024;
    opts.set_max_packet_size(max, max);
    opts.set_inflight(200);
    if let Some(u) = &login.username {
        opts.set_credentials(u.clone(), login.password.clone().unwrap_or_default());
    }
    if let Some(config) = &login.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config.clone())));
    }
    AsyncClient::new(opts, 4096)
}

/// Commands to devices on their `cmd` topic, QoS 1.
pub struct MqttBus {
    pub client: AsyncClient,
    pub topics: Topics,
    /// The embedded broker's admission list (None with an external broker).
    pub gate: Option<Arc<BrokerAuth>>,
}

#[async_trait]
impl DeviceBus for MqttBus {
    async fn send(&self, device: &str, cmd: Command) -> anyhow::Result<()> {
        let payload = flotilla_proto::encode(&Msg::new(new_id(), now_ms(), cmd));
        self.client.publish(self.topics.device(device, Channel::Cmd), QoS::AtLeastOnce, false, payload).await?;
        Ok(())
    }

    fn gate(&self) -> Option<&dyn BrokerGate> {
        self.gate.as_deref().map(|g| g as &dyn BrokerGate)
    }
}

impl BrokerGate for BrokerAuth {
    fn set_device_password(&self, device: &str, sha256_hex: String) {
        BrokerAuth::set_device_password(self, device, sha256_hex)
    }

    fn remove_device_password(&self, device: &str) {
        BrokerAuth::remove_device_password(self, device)
    }

    fn revoke_device(&self, device: &str) -> usize {
        BrokerAuth::revoke_device(self, device)
    }

    fn unrevoke_device(&self, device: &str) {
        BrokerAuth::unrevoke_device(self, device)
    }

    fn revoke_serial(&self, serial: &str) {
        BrokerAuth::revoke_serial(self, serial)
    }
}
