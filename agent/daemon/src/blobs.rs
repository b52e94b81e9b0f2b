//! Content-addressed blob store: `blobs/sha256/<hex>`, written by temp file, fsync, rename and
//! directory fsync, so a crash leaves either the whole blob or none.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    pub fn open(root: &Path) -> anyhow::Result<BlobStore> {
        let dir = root.join("blobs").join("sha256");
        let tmp = root.join("blobs").join("tmp");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        // Leftovers of an interrupted write are garbage.
        for e in std::fs::read_dir(&tmp)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(BlobStore { dir, tmp })
    }

    fn path(&self, sha256: &str) -> anyhow::Result<PathBuf> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("bad blob id {sha256:?}");
        }
        Ok(self.dir.join(sha256))
    }

    pub fn contains(&self, sha256: &str) -> bool {
        self.path(sha256).map(|p| p.exists()).unwrap_or(false)
    }

    /// Write a blob through `fill`, then check it hashes to `sha256` before it becomes visible.
    pub fn import(&self, sha256: &str, fill: impl FnOnce(&mut File) -> anyhow::Result<()>) -> anyhow::Result<()> {
        self.write(sha256, true, fill)
    }

    /// As [`BlobStore::import`], for a `fill` that itself checks the digest of every byte it
    /// writes (artifact extraction does): saves reading the blob back.
    pub fn import_checked(
        &self,
        sha256: &str,
        fill: impl FnOnce(&mut File) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.write(sha256, false, fill)
    }

    fn write(
        &self,
        sha256: &str,
        rehash: bool,
        fill: impl FnOnce(&mut File) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let dest = self.path(sha256)?;
        if dest.exists() {
            return Ok(());
        }
        let tmp_path = self.tmp.join(format!("{sha256}.{}", std::process::id()));
        let mut f = File::create(&tmp_path).with_context(|| format!("creating {}", tmp_path.display()))?;
        let result = fill(&mut f).and_then(|_| {
            f.flush()?;
            f.sync_all()?;
            if rehash {
                let actual = hash_file(&tmp_path)?;
                if actual != sha256 {
                    bail!("blob content hashes to {actual}, expected {sha256}");
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp_path);
            return Err(e);
        }
        std::fs::rename(&tmp_path, &dest).with_context(|| format!("renaming into {}", dest.display()))?;
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Delete every blob not in `keep`; returns how many went. Only call with no install running
    /// (an install imports blobs before the state refers to them).
    pub fn prune(&self, keep: &std::collections::HashSet<String>) -> anyhow::Result<usize> {
        let mut removed = 0;
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                std::fs::remove_file(e.path()).with_context(|| format!("removing blob {name}"))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Read a blob, checking its digest (a flipped bit on disk is caught here).
    pub fn read(&self, sha256: &str) -> anyhow::Result<Vec<u8>> {
        let p = self.path(sha256)?;
        let bytes = std::fs::read(&p).with_context(|| format!("reading blob {}", p.display()))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != sha256 {
            bail!("blob {sha256} is corrupt on disk (hashes to {actual})");
        }
        Ok(bytes)
    }
}

pub fn hash_file(p: &Path) -> anyhow::Result<String> {
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing directory {}", dir.display()))
}

/// Write `bytes` to `path` atomically (temp + fsync + rename + dir fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("path has no parent")?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn import_checks_digest() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let content = b"hello blob";
        let id = hex::encode(Sha256::digest(content));
        let err = s.import(&id, |f| Ok(f.write_all(b"other")?)).unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
        assert!(!s.contains(&id));
        s.import(&id, |f| Ok(f.write_all(content)?)).unwrap();
        assert_eq!(s.read(&id).unwrap(), content);
        std::fs::write(d.path().join("blobs/sha256").join(&id), b"tampered").unwrap();
        assert!(s.read(&id).unwrap_err().to_string().contains("corrupt"));
        assert!(s.read("../../etc/passwd").is_err());
    }
}
