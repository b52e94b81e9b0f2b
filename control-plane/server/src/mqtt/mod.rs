//! The MQTT adapter: the only code that knows rumqttc and rmqtt. The embedded broker
//! ([`broker`]), the control plane's client and the [`MqttBus`] it sends commands over
//! ([`client`]), what devices send in ([`ingest`]), and bundle chunks ([`chunks`]).

pub mod broker;
mod chunks;
pub mod client;
pub mod ingest;

pub use client::{BrokerLogin, MqttBus};
