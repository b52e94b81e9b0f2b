//! Who may call the HTTP API: bearer tokens with a role (`viewer` reads, `operator` drives
//! rollouts, retraining and devices, `admin` also manages tokens and the trust root), stored as
//! SHA-256 hashes; the token itself is shown once, when it is made.
//!
//! Two kinds of request carry a capability instead of a token: a device downloading a bundle it
//! was offered (`/api/v1/bundles/{id}?token=…`), and a training pipeline fetching a job's files or
//! uploading its model (`/api/v1/retrain/jobs/{id}/…?token=…`). A capability is a keyed hash of
//! what it opens, so it opens nothing else. `GET /api/v1/health` and the console's static assets
//! need nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::store::Store;
use crate::{Shared, now_s};

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
pub fn create_token(store: &Store, role: Role, name: &str) -> anyhow::Result<(String, String)> {
    let id = format!("t-{}", crate::new_id());
    let token = format!("flt_{}{}", crate::new_id(), crate::new_id());
    store.add_token(&id, &hash(&token), role.as_str(), name, now_s())?;
    Ok((id, token))
}

/// On the first start (no token at all), make an admin token and write it to
/// `DATA_DIR/admin.token` (mode 0600), so the demo and the CLI work without set-up.
pub fn ensure_admin(store: &Store, data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if !store.tokens()?.is_empty() {
        return Ok(None);
    }
    let (_, token) = create_token(store, Role::Admin, "first start (admin.token)")?;
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
pub fn capability_key(store: &Store) -> anyhow::Result<String> {
    store.setting_or_insert("capability_key", &(crate::new_id() + &crate::new_id() + &crate::new_id()))
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

/// The role a request needs: admin for tokens and pushing trust roots, operator for any other
/// change, viewer to read.
fn required(method: &Method, path: &str) -> Role {
    if path.starts_with("/api/v1/tokens") || (path == "/api/v1/trust/root" && method != Method::GET) {
        Role::Admin
    } else if method == Method::GET || method == Method::HEAD {
        Role::Viewer
    } else {
        Role::Operator
    }
}

/// What a capability in the query string may open here, if anything: (kind, id).
fn capability_scope<'a>(method: &Method, path: &'a str) -> Option<(&'static str, &'a str)> {
    let rest = path.strip_prefix("/api/v1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match (method.clone(), parts.as_slice()) {
        (Method::GET | Method::HEAD, ["bundles", id]) => Some(("bundle", id)),
        (Method::GET, ["retrain", "jobs", id, "files", _]) => Some(("job", id)),
        (Method::POST, ["retrain", "jobs", id, "candidate"]) => Some(("job", id)),
        _ => None,
    }
}

fn query_token(req: &Request) -> Option<&str> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

fn deny(status: StatusCode, code: &str, message: String, hint: &str) -> Response {
    let body = flotilla_api::v1::ApiError { code: code.into(), message, hint: Some(hint.into()) };
    (status, axum::Json(body)).into_response()
}

/// Who made a request (a request extension set by [`middleware`] for token holders).
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: String,
    pub name: String,
    pub role: Role,
}

pub async fn middleware(State(s): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    // A claim carries its own credential (a single-use claim token) in the body.
    let open = path == "/api/v1/health" || (path == "/api/v1/claim" && req.method() == Method::POST);
    let protected = (path.starts_with("/api/") && !open) || path == "/metrics";
    if !protected {
        return next.run(req).await;
    }
    if let (Some((kind, id)), Some(t)) = (capability_scope(req.method(), &path), query_token(&req))
        && t == capability(&s.capability_key, kind, id)
    {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = bearer else {
        return deny(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs a token".into(),
            "send `Authorization: Bearer TOKEN` (CLI: --token or FLOTILLA_TOKEN); a new server writes an admin token to DATA_DIR/admin.token, and `flotilla-server token create --role viewer|operator|admin` makes more",
        );
    };
    let found = s.store.token_by_hash(&hash(token), now_s());
    let (role, caller) = match found {
        Ok(Some(t)) => {
            let role = Role::parse(&t.role).unwrap_or(Role::Viewer);
            (role, Caller { id: t.id, name: t.name, role })
        }
        Ok(None) => {
            return deny(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown or revoked token".into(),
                "check --token / FLOTILLA_TOKEN, or make a new one with `flotilla-server token create`",
            );
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "token lookup failed");
            return deny(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "token lookup failed".into(),
                "see the server log",
            );
        }
    };
    let need = required(req.method(), &path);
    if role < need {
        return deny(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} {path} needs the {} role; this token is {}", req.method(), need.as_str(), role.as_str()),
            "ask an admin for a token with that role (`flotilla-server token create --role ...`)",
        );
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_scopes() {
        assert_eq!(required(&Method::GET, "/api/v1/devices"), Role::Viewer);
        assert_eq!(required(&Method::POST, "/api/v1/rollouts"), Role::Operator);
        assert_eq!(required(&Method::POST, "/api/v1/trust/root"), Role::Admin);
        assert_eq!(required(&Method::GET, "/api/v1/tokens"), Role::Admin);
        assert_eq!(capability_scope(&Method::GET, "/api/v1/bundles/abc"), Some(("bundle", "abc")));
        assert_eq!(capability_scope(&Method::DELETE, "/api/v1/bundles/abc"), None);
        assert_eq!(capability_scope(&Method::GET, "/api/v1/retrain/jobs/j-1/files/samples.json"), Some(("job", "j-1")));
        assert_eq!(capability_scope(&Method::POST, "/api/v1/retrain/jobs/j-1/approve"), None);
        let k = "key";
        assert_ne!(capability(k, "bundle", "a"), capability(k, "job", "a"));
        assert_ne!(capability(k, "bundle", "a"), capability("other", "bundle", "a"));
    }
}
