//! Topic scheme: `{prefix}/d/{device id}/{channel}`.

/// What a topic carries. Device → control plane: hello, state, events, metrics, fetch.
/// Control plane → device: cmd, chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    Hello,
    State,
    Events,
    Metrics,
    Fetch,
    Cmd,
    Chunk,
    /// Certificate renewal requests (device → control plane).
    Csr,
}

impl Channel {
    pub const ALL: [Channel; 8] = [
        Channel::Hello,
        Channel::State,
        Channel::Events,
        Channel::Metrics,
        Channel::Fetch,
        Channel::Cmd,
        Channel::Chunk,
        Channel::Csr,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Hello => "hello",
            Channel::State => "state",
            Channel::Events => "events",
            Channel::Metrics => "metrics",
            Channel::Fetch => "fetch",
            Channel::Cmd => "cmd",
            Channel::Chunk => "chunk",
            Channel::Csr => "csr",
        }
    }

    /// True for channels a device publishes on.
    pub fn from_device(self) -> bool {
        !matches!(self, Channel::Cmd | Channel::Chunk)
    }

    /// The channel named `s` (the last topic level).
    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// The control plane's own MQTT identity: its username, and the prefix of its client id
/// (`flotilla-server-` and 16 hex digits of its data directory).
pub const SERVER_IDENTITY: &str = "flotilla-server";

/// Device ids appear in topics and paths: 1-64 chars of `[A-Za-z0-9._-]`, not starting with `.`,
/// and never one of the names the control plane keeps for itself ([`reserved_id`]).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !reserved_id(id)
}

/// Whether `id` names the control plane's MQTT identity ([`SERVER_IDENTITY`] or anything that
/// begins with it, in any case): a device that could carry such an id could take the control
/// plane's session on the broker.
pub fn reserved_id(id: &str) -> bool {
    id.get(..SERVER_IDENTITY.len()).is_some_and(|head| head.eq_ignore_ascii_case(SERVER_IDENTITY))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics::new(crate::topics::DEFAULT_PREFIX)
    }
}

pub const DEFAULT_PREFIX: &str = "flotilla/v1";

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Topics { prefix: prefix.trim_end_matches('/').to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn device(&self, device_id: &str, ch: Channel) -> String {
        format!("{}/d/{}/{}", self.prefix, device_id, ch.as_str())
    }

    /// The filter the control plane subscribes to for a device channel: `{prefix}/d/+/{channel}`.
    pub fn all_devices(&self, ch: Channel) -> String {
        format!("{}/d/+/{}", self.prefix, ch.as_str())
    }

    /// Everything under one device: `{prefix}/d/{id}/#` (what its ACL allows).
    pub fn device_tree(&self, device_id: &str) -> String {
        format!("{}/d/{}/#", self.prefix, device_id)
    }

    /// Split a topic into (device id, channel), or None if it is not ours.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, Channel)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix("/d/")?;
        let (id, ch) = rest.split_once('/')?;
        if !valid_device_id(id) {
            return None;
        }
        Some((id, Channel::parse(ch)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = Topics::new("flotilla/v1/");
        for ch in Channel::ALL {
            let topic = t.device("dev-1", ch);
            assert_eq!(t.parse(&topic), Some(("dev-1", ch)));
        }
        assert_eq!(t.all_devices(Channel::Hello), "flotilla/v1/d/+/hello");
        assert_eq!(t.parse("flotilla/v1/d/x/unknown"), None);
        assert_eq!(t.parse("other/d/x/hello"), None);
        assert_eq!(t.parse("flotilla/v1/d/+/hello"), None);
        assert_eq!(t.parse("flotilla/v1/d/a/b/hello"), None);
    }

    #[test]
    fn device_ids() {
        assert!(valid_device_id("rpi-4.lab_01"));
        for bad in ["", "a/b", "+", "#", ".x", "a b", &"x".repeat(65)] {
            assert!(!valid_device_id(bad), "{bad:?}");
        }
        // The control plane's identity is nobody else's.
        for reserved in ["flotilla-server", "flotilla-server-0123456789abcdef", "Flotilla-Server-x", "FLOTILLA-SERVER"]
        {
            assert!(reserved_id(reserved) && !valid_device_id(reserved), "{reserved:?}");
        }
        for fine in ["flotilla", "flotilla-serve", "my-flotilla-server", "flotilla-agent-1"] {
            assert!(!reserved_id(fine) && valid_device_id(fine), "{fine:?}");
        }
    }
}
