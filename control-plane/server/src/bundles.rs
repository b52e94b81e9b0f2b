//! The bundle store on disk: `bundles/<sha256 of file>.flb`, registered in the store on push.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_bundle::TrustedRoot;
use flotilla_bundle::format::parse_envelope;
use flotilla_bundle::verify::decode_manifest;
use sha2::{Digest, Sha256};

use crate::store::{BundleRow, Store};

#[derive(Debug)]
pub enum PushError {
    /// The bytes are not an acceptable bundle (HTTP 422).
    Invalid(String),
    /// name@version exists with other content (HTTP 409).
    Conflict(String),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for PushError {
    fn from(e: anyhow::Error) -> Self {
        PushError::Internal(e)
    }
}

#[derive(Debug, Clone)]
pub struct BundleFiles {
    dir: PathBuf,
}

impl BundleFiles {
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let dir = data_dir.join("bundles");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(BundleFiles { dir })
    }

    pub fn path(&self, id: &str) -> Option<PathBuf> {
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| self.dir.join(format!("{id}.flb")))
    }

    /// Validate and store a pushed bundle. With a trust root, its signatures must already meet
    /// the threshold (devices would refuse it anyway; refusing early saves a rollout).
    pub fn push(
        &self,
        store: &Store,
        bytes: &[u8],
        trust: Option<&TrustedRoot>,
        now: i64,
    ) -> Result<BundleRow, PushError> {
        let (doc, data_offset) = parse_envelope(bytes).map_err(|e| PushError::Invalid(e.to_string()))?;
        let manifest = decode_manifest(&doc.signed).map_err(|e| PushError::Invalid(e.to_string()))?;
        let last =
            manifest.artifacts.iter().map(|a| data_offset + a.offset + a.stored_size).max().unwrap_or(data_offset);
        if (bytes.len() as u64) < last {
            return Err(PushError::Invalid(format!(
                "bundle is truncated: {} bytes, artifacts end at {last}",
                bytes.len()
            )));
        }
        let signers = match trust {
            Some(t) => t
                .verify_manifest(&doc, now.max(0) as u64)
                .map_err(|e| PushError::Invalid(format!("bundle is not valid under the server's trust root: {e}")))?
                .signers
                .into_iter()
                .map(|k| k.0)
                .collect(),
            None => doc.signatures.iter().map(|s| s.keyid.0.clone()).collect(),
        };
        let id = hex::encode(Sha256::digest(bytes));
        if let Some(existing) = store.bundle_by_name(&manifest.name, manifest.version)? {
            if existing.id == id {
                return Ok(existing);
            }
            return Err(PushError::Conflict(format!(
                "{}@{} already exists with different content (bundle {}); bump the version",
                manifest.name,
                manifest.version,
                &existing.id[..12]
            )));
        }
        let path = self.path(&id).expect("hex id");
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).context("writing bundle")?;
        f.sync_all().context("syncing bundle")?;
        std::fs::rename(&tmp, &path).context("storing bundle")?;
        let row = BundleRow {
            id,
            name: manifest.name.clone(),
            version: manifest.version,
            size: bytes.len() as u64,
            manifest_sha256: hex::encode(Sha256::digest(&doc.signed)),
            signers,
            created: manifest.created as i64,
            pushed: now,
            head: bytes[..data_offset as usize].to_vec(),
        };
        store.insert_bundle(&row)?;
        Ok(row)
    }

    /// Read `len` bytes at `offset` (for MQTT chunks).
    pub fn read_range(&self, id: &str, offset: u64, len: u32) -> anyhow::Result<(Vec<u8>, u64)> {
        use std::os::unix::fs::FileExt;
        let path = self.path(id).context("bad bundle id")?;
        let f = std::fs::File::open(&path).with_context(|| format!("no bundle {id}"))?;
        let total = f.metadata()?.len();
        anyhow::ensure!(offset <= total, "offset {offset} is past the end ({total})");
        let len = (len as u64).min(total - offset).min(flotilla_proto::DEFAULT_CHUNK_SIZE as u64 * 4) as usize;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)?;
        Ok((buf, total))
    }
}
