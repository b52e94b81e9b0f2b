//! The bundle registry: files on disk (`bundles/<sha256 of file>.flb`), registered in the store
//! on push.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_bundle::TrustedRoot;
use flotilla_bundle::format::parse_envelope;
use flotilla_bundle::verify::decode_manifest;
use sha2::{Digest, Sha256};

use super::{Error, Fleet, Result};
use crate::store::BundleRow;
use crate::util::now_s;

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

    /// Check a pushed bundle without storing it: its envelope and manifest parse, its artifacts
    /// are all there, and with a trust root its signatures already meet the threshold (devices
    /// would refuse it anyway; refusing early saves a rollout). The row it would be stored as.
    pub fn check(bytes: &[u8], trust: Option<&TrustedRoot>, now: i64) -> Result<BundleRow> {
        let invalid = |m: String| {
            Error::unacceptable("invalid_bundle", m)
                .hint("check it locally with `flotilla bundle verify B.flb --trust-root ROOT`")
        };
        let (doc, data_offset) = parse_envelope(bytes).map_err(|e| invalid(e.to_string()))?;
        let manifest = decode_manifest(&doc.signed).map_err(|e| invalid(e.to_string()))?;
        let last =
            manifest.artifacts.iter().map(|a| data_offset + a.offset + a.stored_size).max().unwrap_or(data_offset);
        if (bytes.len() as u64) < last {
            return Err(invalid(format!("bundle is truncated: {} bytes, artifacts end at {last}", bytes.len())));
        }
        let signers = match trust {
            Some(t) => t
                .verify_manifest(&doc, now.max(0) as u64)
                .map_err(|e| invalid(format!("bundle is not valid under the server's trust root: {e}")))?
                .signers
                .into_iter()
                .map(|k| k.0)
                .collect(),
            None => doc.signatures.iter().map(|s| s.keyid.0.clone()).collect(),
        };
        Ok(BundleRow {
            id: hex::encode(Sha256::digest(bytes)),
            name: manifest.name.clone(),
            version: manifest.version,
            size: bytes.len() as u64,
            manifest_sha256: hex::encode(Sha256::digest(&doc.signed)),
            signers,
            created: manifest.created as i64,
            pushed: now,
            head: bytes[..data_offset as usize].to_vec(),
        })
    }

    /// Write a bundle's file (once synced, renamed into place).
    pub fn write(&self, id: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.path(id).context("bad bundle id")?;
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).context("writing bundle")?;
        f.sync_all().context("syncing bundle")?;
        std::fs::rename(&tmp, &path).context("storing bundle")?;
        Ok(())
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

/// Validate and store a pushed bundle (`name@version` once: the same bytes again are the same
/// bundle, other bytes are a conflict).
pub async fn push(f: &Fleet, bytes: bytes::Bytes) -> Result<BundleRow> {
    let trust = f.trust().await?;
    let b2 = bytes.clone();
    let row = tokio::task::spawn_blocking(move || BundleFiles::check(&b2, trust.as_ref(), now_s()))
        .await
        .map_err(anyhow::Error::from)??;
    if let Some(existing) = f.store.bundle_by_name(&row.name, row.version).await? {
        if existing.id == row.id {
            return Ok(existing);
        }
        return Err(Error::conflict(
            "bundle_exists",
            format!(
                "{}@{} already exists with different content (bundle {}); bump the version",
                row.name,
                row.version,
                &existing.id[..12]
            ),
        ));
    }
    let (files, id) = (f.files.clone(), row.id.clone());
    tokio::task::spawn_blocking(move || files.write(&id, &bytes)).await.map_err(anyhow::Error::from)??;
    f.store.insert_bundle(&row).await?;
    Ok(row)
}

pub async fn list(f: &Fleet) -> Result<Vec<BundleRow>> {
    Ok(f.store.bundles().await?)
}

fn no_bundle(what: &str) -> Error {
    Error::not_found("bundle_not_found", format!("no bundle {what}"))
        .hint("push it first with `flotilla bundle push B.flb`")
}

/// A bundle by id.
pub async fn get(f: &Fleet, id: &str) -> Result<BundleRow> {
    f.store.bundle(id).await?.ok_or_else(|| Error::not_found("bundle_not_found", format!("no bundle {id:?}")))
}

/// A bundle by `NAME@VERSION`.
pub async fn by_ref(f: &Fleet, r: &str) -> Result<BundleRow> {
    let parsed = r.split_once('@').and_then(|(n, v)| Some((n, v.parse::<u64>().ok()?)));
    let (name, version) = parsed.ok_or_else(|| {
        Error::invalid("bad_bundle_ref", format!("{r:?} is not NAME@VERSION")).hint("e.g. --bundle digits@3")
    })?;
    f.store.bundle_by_name(name, version).await?.ok_or_else(|| no_bundle(r))
}
