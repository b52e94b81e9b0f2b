//! `~/.config/flotilla/config.toml`: named contexts (a server and its token), like kubectl's.
//! Flags (`--server`, `--token`, `--context`) win over the environment (`FLOTILLA_SERVER`,
//! `FLOTILLA_TOKEN`), which wins over the current context.
//!
//! ```toml
//! current = "lab"
//! [contexts.lab]
//! server = "https://127.0.0.1:8080"
//! token_file = "/var/lib/flotilla/admin.token"   # or: token = "flt_…"
//! ca = "/var/lib/flotilla/pki/ca.pem"            # the fleet CA the server's certificate is from
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::output::{self, Output};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Ctx>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ctx {
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The CA (PEM path, or `system`) the server's certificate is checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl Ctx {
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        match &self.token_file {
            Some(p) => Ok(Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading token file {}", p.display()))?
                    .trim()
                    .into(),
            )),
            None => Ok(None),
        }
    }
}

/// `FLOTILLA_CONFIG`, else `$XDG_CONFIG_HOME/flotilla/config.toml`, else
/// `~/.config/flotilla/config.toml`.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLOTILLA_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("flotilla").join("config.toml"))
}

pub fn load() -> anyhow::Result<Config> {
    let Some(p) = path() else { return Ok(Config::default()) };
    match std::fs::read_to_string(&p) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("{}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn save(c: &Config) -> anyhow::Result<PathBuf> {
    let p = path().context("no home directory: set FLOTILLA_CONFIG to a file path")?;
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = toml::to_string_pretty(c)?;
    // Tokens are secrets: the file is the user's alone.
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    opts.open(&p).and_then(|mut f| f.write_all(text.as_bytes())).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// Where to send requests: (server, token, CA) from flags, environment and the config file.
pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    ca: Option<String>,
    context: Option<&str>,
) -> anyhow::Result<(Option<String>, Option<String>, Option<String>)> {
    let cfg = load()?;
    let name = context.map(String::from).or(cfg.current.clone());
    let ctx = match (&name, context) {
        (Some(n), _) => match cfg.contexts.get(n) {
            Some(c) => Some(c.clone()),
            None if context.is_some() => {
                bail!("no context {n:?} (see `flotilla context ls`)")
            }
            None => None,
        },
        (None, _) => None,
    };
    // A context's CA goes with its server: a --server given here does not inherit it.
    let ca = ca.or_else(|| if server.is_none() { ctx.as_ref().and_then(|c| c.ca.clone()) } else { None });
    let server = server.or_else(|| ctx.as_ref().map(|c| c.server.clone()));
    let token = match token {
        Some(t) => Some(t),
        None => ctx.as_ref().map(|c| c.token()).transpose()?.flatten(),
    };
    Ok((server, token, ca))
}

#[derive(Subcommand, Debug)]
pub enum ContextCmd {
    /// Add (or replace) a context: a server (--server URL) and how to authenticate to it
    /// (--token TOKEN, kept in the config file with mode 0600, or --token-file).
    Add {
        name: String,
        /// A file holding the token (e.g. a server's DATA_DIR/admin.token), read on each use.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Make it the current context.
        #[arg(long = "use")]
        make_current: bool,
    },
    /// Make a context the current one.
    Use { name: String },
    /// List contexts (the current one is marked).
    Ls,
    /// Remove a context.
    Rm { name: String },
}

/// `server` and `token` are the global `--server` and `--token` (a context's own).
pub fn run(
    cmd: ContextCmd,
    server: Option<String>,
    token_value: Option<String>,
    ca: Option<String>,
    out: Output,
) -> anyhow::Result<()> {
    let mut cfg = load()?;
    match cmd {
        ContextCmd::Add { name, token_file, make_current } => {
            let Some(url) = server else { bail!("say where the server is: flotilla context add {name} --server URL") };
            if token_value.is_some() && token_file.is_some() {
                bail!("give --token or --token-file, not both");
            }
            let url = if url.contains("://") { url } else { format!("https://{url}") };
            // Keep the CA's absolute path: the context is used from anywhere.
            let ca = ca.map(|c| match c.as_str() {
                "system" => c,
                path => std::fs::canonicalize(path).map(|p| p.to_string_lossy().into_owned()).unwrap_or(c),
            });
            cfg.contexts.insert(name.clone(), Ctx { server: url, token: token_value, token_file, ca });
            if make_current || cfg.current.is_none() {
                cfg.current = Some(name.clone());
            }
            let p = save(&cfg)?;
            if out == Output::Table {
                println!(
                    "context {name} saved in {}{}",
                    p.display(),
                    if cfg.current.as_deref() == Some(&name) { " (current)" } else { "" }
                );
            }
        }
        ContextCmd::Use { name } => {
            if !cfg.contexts.contains_key(&name) {
                bail!("no context {name:?}: add it with `flotilla context add {name} --server URL --token TOKEN`");
            }
            cfg.current = Some(name.clone());
            save(&cfg)?;
            if out == Output::Table {
                println!("now using context {name}");
            }
        }
        ContextCmd::Rm { name } => {
            if cfg.contexts.remove(&name).is_none() {
                bail!("no context {name:?}");
            }
            if cfg.current.as_deref() == Some(&name) {
                cfg.current = None;
            }
            save(&cfg)?;
        }
        ContextCmd::Ls => {
            let rows: Vec<serde_json::Value> = cfg
                .contexts
                .iter()
                .map(|(n, c)| {
                    serde_json::json!({
                        "name": n, "server": c.server, "current": cfg.current.as_deref() == Some(n),
                        "token": if c.token.is_some() { "inline" } else if c.token_file.is_some() { "file" } else { "none" },
                    })
                })
                .collect();
            if out == Output::Table {
                output::table(
                    &["", "NAME", "SERVER", "TOKEN"],
                    rows.iter()
                        .map(|r| {
                            vec![
                                if r["current"] == true { "*".into() } else { String::new() },
                                r["name"].as_str().unwrap_or_default().into(),
                                r["server"].as_str().unwrap_or_default().into(),
                                r["token"].as_str().unwrap_or_default().into(),
                            ]
                        })
                        .collect(),
                );
            } else {
                output::json(&rows)?;
            }
        }
    }
    Ok(())
}
