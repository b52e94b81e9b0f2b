//! Clocks, ids and time formats every layer uses.

/// Seconds since the Unix epoch.
pub fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// 16 random hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// RFC 3339 of milliseconds since the epoch.
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// RFC 3339 of seconds since the epoch.
pub fn rfc3339(s: i64) -> String {
    rfc3339_ms(s.saturating_mul(1000))
}

/// Seconds since the epoch of an RFC 3339 time (None if it does not parse).
pub fn parse_rfc3339(t: &str) -> Option<i64> {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp())
}

/// Serialize milliseconds since the epoch as RFC 3339.
pub fn serialize_rfc3339_ms<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_ms(*ms))
}
