//! The API's gate: a bearer token with a role, or a capability for the one thing it opens
//! (see [`crate::service::tokens`]). `GET /api/v1/health`, a device's claim and the console's
//! static assets need nothing.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::service::Fleet;
use crate::service::tokens::{self, Role, capability};

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

/// Checks every request's token or capability and the role its route needs; token holders'
/// requests carry their [`Caller`] as an extension.
pub async fn middleware(State(s): State<Arc<Fleet>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    // A claim carries its own credential (a single-use claim token) in the body.
    let open = path == "/api/v1/health" || (path == "/api/v1/claim" && req.method() == Method::POST);
    let protected = (path.starts_with("/api/") && !open) || path == "/metrics";
    if !protected {
        return next.run(req).await;
    }
    if let (Some((kind, id)), Some(t)) = (capability_scope(req.method(), &path), query_token(&req))
        && t == capability(&s.settings.capability_key, kind, id)
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
    let (role, caller) = match tokens::authenticate(&s, token).await {
        Ok(Some(c)) => (c.role, c),
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
    }
}
