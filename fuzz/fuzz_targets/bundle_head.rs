//! Header, envelope and manifest decoding of untrusted bytes: never panics, never allocates
//! past the bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((doc, _)) = flotilla_bundle::format::parse_envelope(data) {
        let _ = flotilla_bundle::verify::decode_manifest(&doc.signed);
    }
});
