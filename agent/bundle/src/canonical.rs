//! Canonical CBOR (RFC 8949 §4.2.1 "core deterministic encoding").
//!
//! Signed documents are encoded through [`ciborium::Value`] with every map's keys sorted by the
//! bytes of their own encoding. ciborium already writes integers and lengths in their shortest
//! form and floats in the shortest lossless width, so sorting keys is the remaining step. Decoding
//! checks the reverse: bytes that do not re-encode to themselves are refused, so a signature always
//! covers exactly one possible byte string per document.

use ciborium::Value;
use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

/// Encode `value` canonically.
pub fn to_vec<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let v = Value::serialized(value).map_err(|e| Error::malformed("document", e))?;
    encode_value(canonicalize(v))
}

/// Decode canonical bytes, refusing anything that is not in canonical form.
///
/// `limit` bounds the input before any parsing happens.
pub fn from_slice<T: DeserializeOwned>(what: &'static str, bytes: &[u8], limit: usize) -> Result<T> {
    if bytes.len() > limit {
        return Err(Error::TooLarge { what, size: bytes.len() as u64, limit: limit as u64 });
    }
    let value: Value = ciborium::de::from_reader(bytes).map_err(|e| Error::malformed(what, e))?;
    let again = encode_value(canonicalize(value.clone()))?;
    if again != bytes {
        return Err(Error::NotCanonical { what });
    }
    value.deserialized().map_err(|e| Error::malformed(what, e))
}

/// Decode without the canonical check (for unsigned containers such as the envelope).
pub fn from_slice_lenient<T: DeserializeOwned>(what: &'static str, bytes: &[u8], limit: usize) -> Result<T> {
    if bytes.len() > limit {
        return Err(Error::TooLarge { what, size: bytes.len() as u64, limit: limit as u64 });
    }
    ciborium::de::from_reader(bytes).map_err(|e| Error::malformed(what, e))
}

fn encode_value(v: Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(&v, &mut out).map_err(|e| Error::malformed("document", e))?;
    Ok(out)
}

fn canonicalize(v: Value) -> Value {
    match v {
        Value::Map(entries) => {
            let mut keyed: Vec<(Vec<u8>, Value, Value)> = entries
                .into_iter()
                .map(|(k, val)| {
                    let k = canonicalize(k);
                    let mut kb = Vec::new();
                    // Encoding a Value into a Vec cannot fail.
                    let _ = ciborium::ser::into_writer(&k, &mut kb);
                    (kb, k, canonicalize(val))
                })
                .collect();
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Map(keyed.into_iter().map(|(_, k, v)| (k, v)).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonicalize).collect()),
        Value::Tag(t, inner) => Value::Tag(t, Box::new(canonicalize(*inner))),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Doc {
        zeta: u64,
        alpha: String,
        mid: Vec<i32>,
        f: f64,
    }

    #[test]
    fn keys_are_sorted_by_encoded_bytes() {
        let bytes = to_vec(&Doc { zeta: 1, alpha: "a".into(), mid: vec![-1, 500], f: 0.5 }).unwrap();
        // map(4), then "f" (shortest key first), "mid", "zeta", "alpha" order by encoded bytes:
        // length-prefixed text sorts shorter keys first.
        let v: Value = ciborium::de::from_reader(&bytes[..]).unwrap();
        let keys: Vec<String> = v.as_map().unwrap().iter().map(|(k, _)| k.as_text().unwrap().to_string()).collect();
        assert_eq!(keys, ["f", "mid", "zeta", "alpha"]);
        // 0.5 fits a half-precision float: 0xf9 0x38 0x00.
        assert!(bytes.windows(3).any(|w| w == [0xf9, 0x38, 0x00]));
    }

    #[test]
    fn stable_bytes_and_round_trip() {
        let doc = Doc { zeta: 70000, alpha: "x".into(), mid: vec![1, 2, 3], f: 1.1 };
        let a = to_vec(&doc).unwrap();
        let b = to_vec(&doc).unwrap();
        assert_eq!(a, b);
        let back: Doc = from_slice("doc", &a, 1 << 20).unwrap();
        assert_eq!(back, doc);
        assert_eq!(to_vec(&back).unwrap(), a);
    }

    #[test]
    fn non_canonical_is_refused() {
        // Same map, keys in declaration (non-canonical) order.
        let mut m = BTreeMap::new();
        m.insert("alpha", 1u8);
        m.insert("b", 2u8);
        let mut raw = Vec::new();
        ciborium::ser::into_writer(&m, &mut raw).unwrap(); // BTreeMap order: "alpha" before "b"
        let err = from_slice::<BTreeMap<String, u8>>("doc", &raw, 1024).unwrap_err();
        assert!(matches!(err, Error::NotCanonical { .. }), "{err}");
        let canon = to_vec(&m).unwrap();
        assert_ne!(canon, raw);
        assert!(from_slice::<BTreeMap<String, u8>>("doc", &canon, 1024).is_ok());
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let err = from_slice::<Value>("doc", &[0u8; 100], 10).unwrap_err();
        assert!(matches!(err, Error::TooLarge { size: 100, limit: 10, .. }));
    }
}
