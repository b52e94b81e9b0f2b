//! The web console: static files embedded in the binary; it reads the same API as the CLI.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Error;

const CONSOLE: [(&str, &str, &str); 3] = [
    ("index.html", "text/html; charset=utf-8", include_str!("../../console/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../console/app.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../../console/style.css")),
];

pub(super) async fn index() -> Response {
    asset(Path("index.html".into())).await
}

pub(super) async fn asset(Path(file): Path<String>) -> Response {
    match CONSOLE.iter().find(|(name, _, _)| *name == file) {
        Some((_, media, body)) => {
            ([(header::CONTENT_TYPE, *media), (header::CACHE_CONTROL, "no-cache")], *body).into_response()
        }
        None => {
            Error::new(StatusCode::NOT_FOUND, "not_found", format!("no console file {file:?}"), None).into_response()
        }
    }
}
