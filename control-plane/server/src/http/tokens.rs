//! `/api/v1/tokens` and `/api/v1/whoami`: API tokens (admin), and who the caller is.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use flotilla_api::v1::{ApiError, Token, TokenCreate};

use super::{ApiErrors, Result, json_body};
use crate::service::{Fleet, tokens};
use crate::store::TokenRow;
use crate::util::{now_s, rfc3339};

#[utoipa::path(
    get,
    path = "/api/v1/whoami",
    tag = "tokens",
    summary = "The calling token's id, name and role",
    responses((status = 200, description = "ok", body = Token), (status = 401, description = "error", body = ApiError))
)]

pub(super) async fn whoami(axum::Extension(c): axum::Extension<tokens::Caller>) -> Json<Token> {
    Json(Token {
        id: c.id,
        role: c.role.as_str().into(),
        name: c.name,
        created: String::new(),
        last_used: None,
        token: None,
    })
}

fn token_view(t: TokenRow) -> Token {
    Token {
        id: t.id,
        role: t.role,
        name: t.name,
        created: rfc3339(t.created),
        last_used: t.last_used.map(rfc3339),
        token: None,
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    tag = "tokens",
    summary = "API tokens (admin; never the secrets)",
    responses((status = 200, description = "ok", body = Vec<Token>), ApiErrors)
)]

pub(super) async fn list_tokens(State(f): State<Arc<Fleet>>) -> Result<Json<Vec<Token>>> {
    Ok(Json(tokens::list(&f).await?.into_iter().map(token_view).collect()))
}

#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    tag = "tokens",
    summary = "Make a token (admin); the secret is in this answer only",
    request_body = TokenCreate,
    responses((status = 201, description = "ok", body = Token), ApiErrors)
)]

pub(super) async fn create_token(
    State(f): State<Arc<Fleet>>,
    body: std::result::Result<Json<TokenCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<Token>)> {
    let req = json_body(body, None)?;
    let (id, role, token) = tokens::create(&f, &req.role, &req.name).await?;
    let created = rfc3339(now_s());
    let t = Token { id, role: role.as_str().into(), name: req.name, created, last_used: None, token: Some(token) };
    Ok((StatusCode::CREATED, Json(t)))
}

#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    tag = "tokens",
    summary = "Revoke a token (admin)",
    params(("id" = String, Path, description = "token id")),
    responses((status = 204, description = "ok"), ApiErrors)
)]

pub(super) async fn revoke_token(State(f): State<Arc<Fleet>>, Path(id): Path<String>) -> Result<StatusCode> {
    tokens::revoke(&f, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
