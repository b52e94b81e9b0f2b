//! Trust roots: the chain the server verifies bundles under and sends to devices. The first root
//! anchors the server; each later one must be the next version, signed by a threshold of the
//! current root's keys and of its own.

use flotilla_bundle::TrustedRoot;
use flotilla_proto::{Command, TrustRoots};

use super::{Error, Fleet, Result};
use crate::store::Store;
use crate::util::now_s;

/// The server's current trust root: the configured one (stored as the start of the chain), then
/// every newer root pushed since, each verified as a rotation of the one before.
pub async fn load(store: &dyn Store, configured: Option<&std::path::Path>) -> anyhow::Result<Option<TrustedRoot>> {
    use anyhow::Context;
    let now = now_s() as u64;
    if let Some(p) = configured {
        let bytes = std::fs::read(p).with_context(|| format!("reading trust root {}", p.display()))?;
        let t = TrustedRoot::anchor(&bytes, now).with_context(|| format!("trust root {}", p.display()))?;
        let stored = store.roots().await?;
        match stored.iter().find(|(v, _)| *v == t.root().version) {
            Some((_, b)) if *b != t.to_bytes() => anyhow::bail!(
                "trust root {} is version {} but the store holds a different root with that version",
                p.display(),
                t.root().version
            ),
            Some(_) => {}
            None => store.add_root(t.root().version, &t.to_bytes(), now_s()).await?,
        }
    }
    let stored = store.roots().await?;
    let Some((_, first)) = stored.first() else { return Ok(None) };
    let anchor = TrustedRoot::anchor(first, 0).context("the store's oldest trust root")?;
    let chain: Vec<Vec<u8>> = stored.into_iter().map(|(_, b)| b).collect();
    Ok(Some(anchor.rotate_chain(&chain, now).context("the store's trust root chain")?))
}

/// Send `device` every stored root newer than `have` (devices skip what they hold). False when
/// it has them all.
pub async fn send_roots(f: &Fleet, device: &str, have: Option<u64>) -> anyhow::Result<bool> {
    let roots: Vec<_> = f.store.roots().await?.into_iter().filter(|(v, _)| Some(*v) > have).collect();
    if roots.is_empty() {
        return Ok(false);
    }
    let cmd = Command::TrustRoots(TrustRoots {
        roots: roots.into_iter().map(|(_, b)| serde_bytes::ByteBuf::from(b)).collect(),
    });
    f.bus.send(device, cmd).await?;
    Ok(true)
}

/// The current root, or `Unavailable`.
pub async fn current(f: &Fleet) -> Result<TrustedRoot> {
    f.trust().await?.ok_or_else(|| {
        Error::new(super::Kind::NotFound, "no_trust_root", "this server has no trust root")
            .hint("push one with `flotilla trust push ROOT`")
    })
}

/// What pushing a root did: its version, and how many devices were sent the chain (None when the
/// same root was pushed again).
pub struct Pushed {
    pub version: u64,
    pub devices: Option<u64>,
}

/// Accept a new trust root and send it to every device.
pub async fn push(f: &Fleet, body: &[u8]) -> Result<Pushed> {
    let now = now_s();
    let invalid = |e: flotilla_bundle::Error| {
        Error::unacceptable("invalid_root", e.to_string())
            .hint("check it with `flotilla trust verify ROOT --from CURRENT`")
    };
    let next = match f.trust().await? {
        None => TrustedRoot::anchor(body, now as u64).map_err(invalid)?,
        Some(cur) => {
            let (root, _) = flotilla_bundle::root::decode_untrusted(body).map_err(invalid)?;
            if root.version <= cur.root().version {
                let same = f.store.roots().await?.iter().any(|(v, b)| *v == root.version && b.as_slice() == body);
                if same {
                    return Ok(Pushed { version: root.version, devices: None });
                }
                return Err(Error::conflict(
                    "root_not_newer",
                    format!(
                        "root version {} is not newer than the current version {}",
                        root.version,
                        cur.root().version
                    ),
                )
                .hint("rotate with `flotilla trust rotate --from CURRENT`"));
            }
            cur.rotate(body, now as u64).map_err(invalid)?
        }
    };
    let version = next.root().version;
    f.store.add_root(version, &next.to_bytes(), now).await?;
    *f.trust.write().expect("trust lock") = Some(next);
    let mut sent = 0;
    for d in f.store.devices().await? {
        let have = f.store.device_root_version(&d.id).await?;
        if send_roots(f, &d.id, have).await? {
            sent += 1;
        }
    }
    tracing::info!(version, devices = sent, "trust root updated");
    Ok(Pushed { version, devices: Some(sent) })
}
