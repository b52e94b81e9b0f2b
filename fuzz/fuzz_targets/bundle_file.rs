//! A whole bundle under a fixed trust root: verification and artifact extraction on untrusted
//! bytes (the seed corpus holds validly signed bundles, so mutations reach the artifacts).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

use flotilla_bundle::TrustedRoot;

fn root() -> &'static TrustedRoot {
    static ROOT: OnceLock<TrustedRoot> = OnceLock::new();
    // The corpus's single-key root (seed [1; 32]).
    ROOT.get_or_init(|| {
        TrustedRoot::anchor(include_bytes!("../../tests/corpus/valid-single-key/root.cbor"), 1_800_000_000).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut f = std::io::Cursor::new(data);
    let Ok((doc, off)) = flotilla_bundle::format::read_envelope(&mut f) else { return };
    let Ok(v) = root().verify_manifest(&doc, 1_800_000_000) else {
        // Unsigned mutations still exercise manifest decoding.
        let _ = flotilla_bundle::verify::decode_manifest(&doc.signed);
        return;
    };
    for a in &v.manifest.artifacts {
        let _ = flotilla_bundle::format::extract_artifact(&mut f, off, a, None, std::io::sink());
    }
});
