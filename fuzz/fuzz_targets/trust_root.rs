//! Trust-root decoding, anchoring and rotation on untrusted bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flotilla_bundle::root::decode_untrusted(data);
    if let Ok(t) = flotilla_bundle::TrustedRoot::anchor(data, 1_800_000_000) {
        let _ = t.rotate(data, 1_800_000_000);
    }
});
