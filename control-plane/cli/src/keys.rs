//! `flotilla keygen` and `flotilla trust`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use flotilla_bundle::root::{Root, TrustedRoot, decode_untrusted, sign_root};
use flotilla_bundle::{PublicKey, SecretKey};

use crate::output::{self, Output};

#[derive(Subcommand, Debug)]
pub enum TrustCmd {
    /// Create a trust root (version 1). With --key, that one key holds every role, threshold 1.
    Init {
        /// Signing key that holds the root and targets roles.
        #[arg(long, value_name = "PREFIX.key")]
        key: PathBuf,
        /// Where to write the root document.
        #[arg(long, value_name = "ROOT")]
        out: PathBuf,
        /// Expiry: RFC 3339 time or a duration such as 365d.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Check a root's self-signatures and print what it trusts.
    Inspect { root: PathBuf },
}

pub fn keygen(prefix: &Path, out: Output) -> anyhow::Result<()> {
    let key = SecretKey::generate()?;
    let (k, p) = key
        .save(prefix)
        .with_context(|| format!("writing {}.key (an existing key is never overwritten)", prefix.display()))?;
    match out {
        Output::Json => output::json(&serde_json::json!({"key": k, "pub": p, "key_id": key.key_id().0})),
        Output::Table => {
            println!("wrote {} (secret, mode 0600) and {}", k.display(), p.display());
            println!("key id {}", key.key_id());
            Ok(())
        }
    }
}

pub fn trust(cmd: TrustCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        TrustCmd::Init { key, out: path, expires } => {
            let key = SecretKey::load(&key)?;
            let now = crate::bundle::unix_now();
            let expires = expires.map(|e| crate::bundle::parse_time(&e, now)).transpose()?;
            let root = Root::single_key(&key.public(), now, expires);
            let bytes = sign_root(&root, &[&key])?;
            std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
            match out {
                Output::Json => {
                    output::json(&serde_json::json!({"root": path, "version": 1, "key_id": key.key_id().0}))
                }
                Output::Table => {
                    println!(
                        "wrote trust root v1 to {} (key {} holds root and targets, threshold 1)",
                        path.display(),
                        key.key_id()
                    );
                    Ok(())
                }
            }
        }
        TrustCmd::Inspect { root } => {
            let bytes = std::fs::read(&root).with_context(|| format!("reading {}", root.display()))?;
            let (r, doc) = decode_untrusted(&bytes)?;
            let valid = TrustedRoot::anchor(&bytes, crate::bundle::unix_now()).map(|_| ()).map_err(|e| e.to_string());
            let view = serde_json::json!({
                "version": r.version,
                "created": r.created,
                "expires": r.expires,
                "keys": r.keys.iter().map(|(id, k)| (id.0.clone(), PublicKey::to_pem(k).unwrap_or_default())).collect::<std::collections::BTreeMap<_, _>>(),
                "roles": r.roles.iter().map(|(n, role)| (n.clone(), serde_json::json!({"keyids": role.keyids.iter().map(|k| &k.0).collect::<Vec<_>>(), "threshold": role.threshold}))).collect::<std::collections::BTreeMap<_, _>>(),
                "signatures": doc.signatures.iter().map(|s| &s.keyid.0).collect::<Vec<_>>(),
                "self_signed_valid": valid.is_ok(),
                "error": valid.as_ref().err(),
            });
            match out {
                Output::Json => output::json(&view)?,
                Output::Table => println!("{}", serde_json::to_string_pretty(&view)?),
            }
            valid.map_err(anyhow::Error::msg)
        }
    }
}
