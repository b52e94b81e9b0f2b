//! The bundle file: a fixed header, the signed envelope, then the artifacts' stored bytes.
//!
//! ```text
//! 0      8  magic "FLOTBNDL"
//! 8      2  format version (u16 big-endian) = 1
//! 10     4  envelope length L (u32 big-endian), at most MAX_ENVELOPE
//! 14     L  envelope: CBOR {signed: canonical manifest bytes, signatures: [...]}
//! 14+L   .. data section: each artifact's stored bytes at its manifest offset
//! ```
//! Offsets are relative to the data section, so adding a signature (which grows the envelope)
//! never changes the signed manifest.

use std::io::{Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use crate::canonical;
use crate::error::{Error, Result};
use crate::manifest::{Artifact, Encoding};
use crate::signed::SignedDoc;

pub const MAGIC: &[u8; 8] = b"FLOTBNDL";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 14;
/// The envelope holds the manifest and signatures only (golden data and baselines are artifacts).
pub const MAX_ENVELOPE: u32 = 1 << 20;

/// The fixed-size header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub envelope_len: u32,
}

impl Header {
    /// Parse the header from the start of `buf`; says how many bytes are missing when short.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < HEADER_LEN {
            // Refuse wrong magic as early as the bytes allow.
            if !MAGIC.starts_with(&buf[..buf.len().min(MAGIC.len())]) {
                return Err(Error::BadMagic);
            }
            return Err(Error::Truncated { what: "bundle header", needed: (HEADER_LEN - buf.len()) as u64 });
        }
        if &buf[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u16::from_be_bytes([buf[8], buf[9]]);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedFormat { found: version, supported: FORMAT_VERSION });
        }
        let envelope_len = u32::from_be_bytes([buf[10], buf[11], buf[12], buf[13]]);
        if envelope_len > MAX_ENVELOPE {
            return Err(Error::TooLarge {
                what: "bundle envelope",
                size: envelope_len as u64,
                limit: MAX_ENVELOPE as u64,
            });
        }
        Ok(Header { envelope_len })
    }

    pub fn data_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.envelope_len as u64
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        h[10..14].copy_from_slice(&self.envelope_len.to_be_bytes());
        h
    }
}

/// Parse header and envelope from the start of a bundle held in memory (it may hold more).
/// Returns the envelope and the data section's offset.
pub fn parse_envelope(buf: &[u8]) -> Result<(SignedDoc, u64)> {
    let header = Header::parse(buf)?;
    let end = header.data_offset() as usize;
    if buf.len() < end {
        return Err(Error::Truncated { what: "bundle envelope", needed: (end - buf.len()) as u64 });
    }
    let doc = decode_envelope(&buf[HEADER_LEN..end])?;
    Ok((doc, header.data_offset()))
}

/// Read header and envelope from a stream positioned at the bundle's start.
pub fn read_envelope<R: Read>(r: &mut R) -> Result<(SignedDoc, u64)> {
    let mut h = [0u8; HEADER_LEN];
    read_exact(r, &mut h, "bundle header")?;
    let header = Header::parse(&h)?;
    let mut env = vec![0u8; header.envelope_len as usize];
    read_exact(r, &mut env, "bundle envelope")?;
    Ok((decode_envelope(&env)?, header.data_offset()))
}

pub fn decode_envelope(bytes: &[u8]) -> Result<SignedDoc> {
    canonical::from_slice_lenient("bundle envelope", bytes, MAX_ENVELOPE as usize)
}

/// Encode header + envelope.
pub fn encode_head(doc: &SignedDoc) -> Result<Vec<u8>> {
    let env = canonical::to_vec(doc)?;
    if env.len() > MAX_ENVELOPE as usize {
        return Err(Error::TooLarge { what: "bundle envelope", size: env.len() as u64, limit: MAX_ENVELOPE as u64 });
    }
    let mut out = Header { envelope_len: env.len() as u32 }.encode().to_vec();
    out.extend_from_slice(&env);
    Ok(out)
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Err(Error::Truncated { what, needed: (buf.len() - filled) as u64 }),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(what, e)),
        }
    }
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A writer that hashes and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
    limit: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other("content exceeds its declared size"));
        }
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Extract one artifact's content into `out`, checking everything the manifest promises.
///
/// The stored bytes' digest is checked before the decompressor sees them, so zstd only ever
/// parses signed bytes; decompression stops at the declared size; the content digest is checked
/// last. `base` is the content a `zstd-patch` artifact was made against (checked by digest).
/// On error `out` may hold partial content: write to a temporary file, rename on success.
pub fn extract_artifact<R: Read + Seek, W: Write>(
    r: &mut R,
    data_offset: u64,
    a: &Artifact,
    base: Option<&[u8]>,
    out: W,
) -> Result<()> {
    let start = data_offset
        .checked_add(a.offset)
        .ok_or_else(|| Error::Artifact { name: a.name.clone(), detail: "offset overflows".into() })?;
    // Pass 1: digest of stored bytes.
    r.seek(SeekFrom::Start(start)).map_err(|e| Error::io("bundle", e))?;
    let mut hasher = Sha256::new();
    let mut left = a.stored_size;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        read_exact(r, &mut buf[..want], "artifact data")?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    let stored = hex::encode(hasher.finalize());
    if stored != a.stored_sha256 {
        return Err(Error::DigestMismatch { name: a.name.clone(), expected: a.stored_sha256.clone(), actual: stored });
    }
    // Pass 2: decompress with a hard output limit, hashing the content.
    r.seek(SeekFrom::Start(start)).map_err(|e| Error::io("bundle", e))?;
    let stored_reader = std::io::BufReader::with_capacity(256 * 1024, r.take(a.stored_size));
    let mut sink = HashingWriter { inner: out, hasher: Sha256::new(), written: 0, limit: a.size };
    let detail =
        |e: std::io::Error| Error::Artifact { name: a.name.clone(), detail: format!("decompression failed: {e}") };
    match &a.encoding {
        Encoding::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(stored_reader).map_err(detail)?;
            std::io::copy(&mut dec, &mut sink).map_err(detail)?;
        }
        Encoding::ZstdPatch { base_sha256 } => {
            let base = base.ok_or_else(|| Error::Artifact {
                name: a.name.clone(),
                detail: format!("delta against base {base_sha256} which is not available"),
            })?;
            let have = sha256_hex(base);
            if &have != base_sha256 {
                return Err(Error::DigestMismatch {
                    name: format!("{} (delta base)", a.name),
                    expected: base_sha256.clone(),
                    actual: have,
                });
            }
            let mut dec = zstd::stream::read::Decoder::with_ref_prefix(stored_reader, base).map_err(detail)?;
            dec.window_log_max(31).map_err(detail)?;
            std::io::copy(&mut dec, &mut sink).map_err(detail)?;
        }
    }
    if sink.written != a.size {
        return Err(Error::Artifact {
            name: a.name.clone(),
            detail: format!("content is {} bytes, manifest says {}", sink.written, a.size),
        });
    }
    let content = hex::encode(sink.hasher.finalize());
    if content != a.sha256 {
        return Err(Error::DigestMismatch { name: a.name.clone(), expected: a.sha256.clone(), actual: content });
    }
    sink.inner.flush().map_err(|e| Error::io("artifact output", e))?;
    Ok(())
}

/// Extract into memory (for small artifacts such as golden data).
pub fn extract_artifact_to_vec<R: Read + Seek>(
    r: &mut R,
    data_offset: u64,
    a: &Artifact,
    base: Option<&[u8]>,
    limit: u64,
) -> Result<Vec<u8>> {
    if a.size > limit {
        return Err(Error::TooLarge { what: "artifact", size: a.size, limit });
    }
    let mut out = Vec::with_capacity(a.size as usize);
    extract_artifact(r, data_offset, a, base, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_need_more() {
        let h = Header { envelope_len: 1234 };
        let bytes = h.encode();
        assert_eq!(Header::parse(&bytes).unwrap(), h);
        assert!(matches!(Header::parse(&bytes[..5]).unwrap_err(), Error::Truncated { needed: 9, .. }));
        assert!(matches!(Header::parse(b"NOTABUND").unwrap_err(), Error::BadMagic));
        assert!(matches!(Header::parse(b"ZZ").unwrap_err(), Error::BadMagic));
        let mut v2 = bytes;
        v2[9] = 2;
        assert!(matches!(Header::parse(&v2).unwrap_err(), Error::UnsupportedFormat { found: 2, .. }));
        let big = Header { envelope_len: MAX_ENVELOPE + 1 }.encode();
        assert!(matches!(Header::parse(&big).unwrap_err(), Error::TooLarge { .. }));
    }
}
