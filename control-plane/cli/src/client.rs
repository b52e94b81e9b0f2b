//! A small blocking HTTP client for the control plane's API.

use anyhow::{Context, bail};
use flotilla_api::v1::ApiError;
use serde::{Serialize, de::DeserializeOwned};

pub struct Client {
    base: String,
    http: reqwest::blocking::Client,
}

/// The API token for this run (`--token`, FLOTILLA_TOKEN), set once by `main`.
pub static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// The CA for this run (`--ca`, FLOTILLA_CA, the context's): a PEM path or `system`.
pub static CA: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// A blocking client that trusts the chosen CA alone (or the system's, when asked).
pub fn http_client(base: &str) -> anyhow::Result<reqwest::blocking::ClientBuilder> {
    // reqwest builds TLS for every client, even one for http://: ring, never aws-lc-rs.
    flotilla_pki::tls::install_default_provider();
    let b = reqwest::blocking::Client::builder();
    if !base.starts_with("https://") {
        return Ok(b);
    }
    match CA.get().cloned().flatten().as_deref() {
        Some("system") => Ok(b),
        Some(path) => {
            let pem = std::fs::read_to_string(path).with_context(|| format!("reading the CA {path}"))?;
            let config = flotilla_pki::tls::client_config(&pem, None).with_context(|| format!("the CA {path}"))?;
            Ok(b.tls_backend_preconfigured(config))
        }
        None => bail!(
            "{base} speaks HTTPS: say which CA to trust with --ca FILE (the server's DATA_DIR/pki/ca.pem, \
             the `ca` of its endpoints.json), FLOTILLA_CA, or a context's `ca`; --ca system trusts the \
             system's public CAs"
        ),
    }
}

impl Client {
    pub fn new(server: Option<&str>) -> anyhow::Result<Client> {
        let Some(base) = server else {
            bail!(
                "no server configured: pass --server URL, set FLOTILLA_SERVER, or run \
                 `flotilla context add NAME --server http://HOST:8080 --token-file DATA_DIR/admin.token`"
            );
        };
        let base = if base.contains("://") { base.to_string() } else { format!("https://{base}") };
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = TOKEN.get().cloned().flatten() {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                .context("the token has characters a header cannot carry")?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = http_client(&base)?.timeout(std::time::Duration::from_secs(600)).default_headers(headers).build()?;
        Ok(Client { base: base.trim_end_matches('/').to_string(), http })
    }

    /// The response's body when it succeeded; else the API's error (code, message, hint).
    fn body(&self, what: &str, r: reqwest::Result<reqwest::blocking::Response>) -> anyhow::Result<Vec<u8>> {
        let r = r.with_context(|| format!("cannot reach the control plane at {} ({what})", self.base))?;
        let status = r.status();
        let body = r.bytes()?;
        if status.is_success() {
            return Ok(body.to_vec());
        }
        match serde_json::from_slice::<ApiError>(&body) {
            Ok(ApiError { code, message, hint: Some(h) }) => {
                bail!("{} ({code}): {message}\nhint: {h}", status.as_u16())
            }
            Ok(ApiError { code, message, hint: None }) => bail!("{} ({code}): {message}", status.as_u16()),
            Err(_) => bail!("{what}: HTTP {status}: {}", String::from_utf8_lossy(&body)),
        }
    }

    fn handle<T: DeserializeOwned>(
        &self,
        what: &str,
        r: reqwest::Result<reqwest::blocking::Response>,
    ) -> anyhow::Result<T> {
        let body = self.body(what, r)?;
        serde_json::from_slice(&body).with_context(|| format!("{what}: unexpected response"))
    }

    /// GET a page of a list: the items and the next page's cursor (`Flotilla-Next`), if any.
    pub fn get_page<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<(Vec<T>, Option<String>)> {
        let r = self.http.get(format!("{}{path}", self.base)).send();
        let next = r
            .as_ref()
            .ok()
            .and_then(|r| r.headers().get("flotilla-next"))
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let body = self.body(path, r)?;
        let items = serde_json::from_slice(&body).with_context(|| format!("{path}: unexpected response"))?;
        Ok((items, next))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.handle(path, self.http.get(format!("{}{path}", self.base)).send())
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.handle(path, self.http.post(format!("{}{path}", self.base)).json(body).send())
    }

    pub fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.handle(path, self.http.put(format!("{}{path}", self.base)).json(body).send())
    }

    /// DELETE; success has no body.
    pub fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.body(path, self.http.delete(format!("{}{path}", self.base)).send()).map(drop)
    }

    /// GET raw bytes (files).
    pub fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        self.body(path, self.http.get(format!("{}{path}", self.base)).send())
    }

    /// POST a bundle streamed from `body` (`len` bytes), e.g. a file behind a progress bar.
    pub fn post_reader<T: DeserializeOwned, R: std::io::Read + Send + 'static>(
        &self,
        path: &str,
        body: R,
        len: u64,
    ) -> anyhow::Result<T> {
        self.handle(
            path,
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/vnd.flotilla.bundle")
                .body(reqwest::blocking::Body::sized(body, len))
                .send(),
        )
    }

    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> anyhow::Result<T> {
        self.handle(
            path,
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/vnd.flotilla.bundle")
                .body(body)
                .send(),
        )
    }
}
