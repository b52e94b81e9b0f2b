//! The way out to devices. The services say "send this command to that device"; the MQTT
//! adapter ([`crate::mqtt::MqttBus`]) knows topics, QoS and the broker.

use async_trait::async_trait;
use flotilla_proto::Command;

#[async_trait]
pub trait DeviceBus: Send + Sync {
    /// Send `cmd` to `device` (at least once; devices drop repeats by message id).
    async fn send(&self, device: &str, cmd: Command) -> anyhow::Result<()>;

    /// The broker's own admission list, when the broker is ours (the embedded one): told at once
    /// about enrolled passwords and revocations. None with an external broker.
    fn gate(&self) -> Option<&dyn BrokerGate> {
        None
    }
}

/// Who the embedded broker admits.
pub trait BrokerGate: Send + Sync {
    fn set_device_password(&self, device: &str, sha256_hex: String);
    fn remove_device_password(&self, device: &str);
    /// Refuse the device from now on and end its live connections; how many it ended.
    fn revoke_device(&self, device: &str) -> usize;
    /// Admit a device again (it was given a new certificate).
    fn unrevoke_device(&self, device: &str);
    fn revoke_serial(&self, serial: &str);
}
