//! Who may call the API: bearer tokens with a role (`viewer` reads, `operator` drives
//! rollouts, retraining and devices, `admin` also manages tokens and the trust root), stored as
//! SHA-256 hashes; the token itself is shown once, when it is made.
//!
//! Two kinds of request carry a capability instead of a token: a device downloading a bundle it
//! was offered (`/api/v1/bundles/{id}?token=…`), and a training pipeline fetching a job's files or
//! uploading its model (`/api/v1/retrain/jobs/{id}/…?token=…`). A capability is a keyed hash of
//! what it opens, so it opens nothing else. `GET /api/v1/health` and the console's static assets
//! need nothing.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

use super::{Error, Fleet, Result};
use crate::store::{Store, TokenRow};
use crate::util::{new_id, now_s};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

pub const ADMIN_TOKEN_FILE: &str = "admin.token";

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Make a token with `role`; returns (id, token). Only the hash is stored.
pub async fn create_token(store: &dyn Store, role: Role, name: &str) -> anyhow::Result<(String, String)> {
    let id = format!("t-{}", new_id());
    let token = format!("flt_{}{}", new_id(), new_id());
    store.add_token(&id, &hash(&token), role.as_str(), name, now_s()).await?;
    Ok((id, token))
}

/// `POST /api/v1/tokens`: a token with the role named `role`; returns (id, role, secret).
pub async fn create(f: &Fleet, role: &str, name: &str) -> Result<(String, Role, String)> {
    let role = Role::parse(role).ok_or_else(|| {
        Error::invalid("bad_role", format!("no role {role:?}"))
            .hint("roles are viewer (read), operator (rollouts, retraining, devices) and admin (tokens, trust root)")
    })?;
    let (id, token) = create_token(f.store.as_ref(), role, name).await?;
    Ok((id, role, token))
}

pub async fn list(f: &Fleet) -> Result<Vec<TokenRow>> {
    Ok(f.store.tokens().await?)
}

pub async fn revoke(f: &Fleet, id: &str) -> Result<()> {
    if f.store.delete_token(id).await? {
        Ok(())
    } else {
        Err(Error::not_found("token_not_found", format!("no token {id:?}")))
    }
}

/// Who holds `token` (None: unknown or revoked). Records its use.
pub async fn authenticate(f: &Fleet, token: &str) -> anyhow::Result<Option<Caller>> {
    Ok(f.store.token_by_hash(&hash(token), now_s()).await?.map(|t| {
        let role = Role::parse(&t.role).unwrap_or(Role::Viewer);
        Caller { id: t.id, name: t.name, role }
    }))
}

/// Who made a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: String,
    pub name: String,
    pub role: Role,
}

/// On the first start (no token at all), make an admin token and write it to
/// `DATA_DIR/admin.token` (mode 0600), so the demo and the CLI work without set-up.
pub async fn ensure_admin(store: &dyn Store, data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if !store.tokens().await?.is_empty() {
        return Ok(None);
    }
    let (_, token) = create_token(store, Role::Admin, "first start (admin.token)").await?;
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts.open(&path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    tracing::info!(path = %path.display(), "created an admin token");
    Ok(Some(path))
}

/// The key capabilities are derived from (random, made on the first start, kept in the store).
pub async fn capability_key(store: &dyn Store) -> anyhow::Result<String> {
    store.setting_or_insert("capability_key", &(new_id() + &new_id() + &new_id())).await
}

/// The capability that opens `kind`/`id` (a bundle download, a retraining job's files).
pub fn capability(key: &str, kind: &str, id: &str) -> String {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_open_one_thing() {
        let k = "key";
        assert_ne!(capability(k, "bundle", "a"), capability(k, "job", "a"));
        assert_ne!(capability(k, "bundle", "a"), capability("other", "bundle", "a"));
        assert_eq!(capability(k, "bundle", "a"), capability(k, "bundle", "a"));
    }
}
