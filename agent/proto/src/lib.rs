//! The MQTT contract between agents and the control plane: topic scheme and CBOR payloads.
//!
//! Every payload is a [`Msg`]: a schema version, a message id (handlers are idempotent on it), a
//! timestamp in milliseconds, and a typed body. This crate does no I/O and reads no clock: callers
//! pass ids and times in.

pub mod messages;
pub mod tags;
pub mod topics;

pub use messages::*;
pub use topics::{Channel, SERVER_IDENTITY, Topics, reserved_id, valid_device_id};

use serde::{Serialize, de::DeserializeOwned};

/// Schema version of every payload this build writes and the newest it reads.
pub const SCHEMA: u32 = 1;
/// Largest payload either side accepts; MQTT clients must allow packets at least this large.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Default size of a bundle chunk sent over MQTT.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("payload of {size} bytes is over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("payload schema {found} is newer than this build understands ({supported})")]
    Schema { found: u32, supported: u32 },
    #[error("malformed payload: {0}")]
    Malformed(String),
}

/// One message on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Msg<T> {
    pub v: u32,
    pub id: String,
    /// Milliseconds since the Unix epoch, by the sender's clock.
    pub ts: u64,
    pub body: T,
}

impl<T> Msg<T> {
    pub fn new(id: impl Into<String>, ts: u64, body: T) -> Self {
        Msg { v: SCHEMA, id: id.into(), ts, body }
    }
}

pub fn encode<T: Serialize>(msg: &Msg<T>) -> Vec<u8> {
    let mut out = Vec::new();
    // Serialising our own types into a Vec cannot fail.
    ciborium::ser::into_writer(msg, &mut out).expect("CBOR encoding of a protocol message");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Msg<T>, ProtoError> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge { size: bytes.len(), limit: MAX_PAYLOAD });
    }
    // Peek at the version first, so a newer peer gets a clear error instead of a field mismatch.
    #[derive(serde::Deserialize)]
    struct Version {
        v: u32,
    }
    let head: Version = ciborium::de::from_reader(bytes).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if head.v > SCHEMA || head.v == 0 {
        return Err(ProtoError::Schema { found: head.v, supported: SCHEMA });
    }
    ciborium::de::from_reader(bytes).map_err(|e| ProtoError::Malformed(e.to_string()))
}
