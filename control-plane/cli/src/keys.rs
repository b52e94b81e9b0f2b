//! `flotilla keygen` and `flotilla trust`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use flotilla_bundle::root::{Root, TrustedRoot, add_root_signature, decode_untrusted, sign_root};
use flotilla_bundle::signed::RoleKeys;
use flotilla_bundle::{PublicKey, SecretKey};

use crate::output::{self, Output};

#[derive(Subcommand, Debug)]
pub enum TrustCmd {
    /// Create a trust root (version 1). `--key K` alone makes K hold every role with threshold 1;
    /// otherwise name the role keys and thresholds and who signs.
    Init {
        /// One signing key that holds the root and targets roles (and signs).
        #[arg(long, value_name = "PREFIX.key")]
        key: Option<PathBuf>,
        #[command(flatten)]
        spec: RootSpec,
        /// Where to write the root document.
        #[arg(long, value_name = "ROOT")]
        out: PathBuf,
    },
    /// Make root N+1 from root N. Roles not named keep their keys and thresholds. It must be
    /// signed by a threshold of root N's root keys and of its own (see `trust sign`).
    Rotate {
        /// The current root (version N).
        #[arg(long, value_name = "ROOT")]
        from: PathBuf,
        #[command(flatten)]
        spec: RootSpec,
        #[arg(long, value_name = "ROOT")]
        out: PathBuf,
    },
    /// Add your signature to a root (holders of a threshold sign in turn, offline).
    Sign {
        root: PathBuf,
        #[arg(long, value_name = "PREFIX.key")]
        key: PathBuf,
    },
    /// Check a root: its own signatures, and with --from, that it is a valid rotation of that
    /// root. Exits non-zero when invalid.
    Verify {
        root: PathBuf,
        #[arg(long, value_name = "OLDROOT")]
        from: Option<PathBuf>,
    },
    /// Show what a root trusts (no trust decision beyond its self-signatures).
    Inspect { root: PathBuf },
    /// Hand a new root to the control plane, which sends it to every device.
    Push { root: PathBuf },
}

/// Role keys, thresholds, signers and expiry, shared by `init` and `rotate`.
#[derive(clap::Args, Debug, Default)]
pub struct RootSpec {
    /// Public key (PEM) of the root role (repeatable).
    #[arg(long = "root-key", value_name = "PUB")]
    root_keys: Vec<PathBuf>,
    /// Public key (PEM) of the targets role, which signs bundles (repeatable).
    #[arg(long = "targets-key", value_name = "PUB")]
    targets_keys: Vec<PathBuf>,
    /// Distinct root keys that must sign a root.
    #[arg(long, value_name = "N")]
    root_threshold: Option<u32>,
    /// Distinct targets keys that must sign a bundle.
    #[arg(long, value_name = "N")]
    targets_threshold: Option<u32>,
    /// Secret key to sign the new root with (repeatable).
    #[arg(long = "sign-with", value_name = "KEY")]
    sign_with: Vec<PathBuf>,
    /// Expiry: RFC 3339 time or a duration such as 365d.
    #[arg(long)]
    expires: Option<String>,
}

fn load_pubs(paths: &[PathBuf]) -> anyhow::Result<Vec<PublicKey>> {
    paths.iter().map(|p| PublicKey::load(p).with_context(|| format!("reading public key {}", p.display()))).collect()
}

fn load_secrets(paths: &[PathBuf]) -> anyhow::Result<Vec<SecretKey>> {
    paths.iter().map(|p| SecretKey::load(p).with_context(|| format!("reading secret key {}", p.display()))).collect()
}

/// Set a role's keys (when given) and threshold (when given), keeping `keys` in step.
fn set_role(root: &mut Root, role: &str, keys: Vec<PublicKey>, threshold: Option<u32>) {
    let entry = root.roles.entry(role.to_string()).or_insert(RoleKeys { keyids: vec![], threshold: 1 });
    if !keys.is_empty() {
        entry.keyids = keys.iter().map(|k| k.key_id()).collect();
        entry.keyids.sort();
        entry.keyids.dedup();
        for k in keys {
            root.keys.insert(k.key_id(), k);
        }
    }
    if let Some(t) = threshold {
        entry.threshold = t;
    }
}

/// Drop keys no role names any more.
fn prune_keys(root: &mut Root) {
    let used: std::collections::BTreeSet<_> = root.roles.values().flat_map(|r| r.keyids.iter().cloned()).collect();
    root.keys.retain(|id, _| used.contains(id));
}

fn write_root(
    path: &Path,
    root: &Root,
    signers: &[SecretKey],
    previous: Option<&TrustedRoot>,
    out: Output,
) -> anyhow::Result<()> {
    let refs: Vec<&SecretKey> = signers.iter().collect();
    let bytes = sign_root(root, &refs)?;
    std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    let now = crate::bundle::unix_now();
    let status = match previous {
        None => TrustedRoot::anchor(&bytes, now).map(|_| ()),
        Some(p) => p.rotate(&bytes, now).map(|_| ()),
    };
    match out {
        Output::Json | Output::Yaml => output::json(&serde_json::json!({
            "root": path, "version": root.version, "complete": status.is_ok(),
            "missing": status.as_ref().err().map(|e| e.to_string()),
        })),
        Output::Table => {
            println!("wrote trust root v{} to {}", root.version, path.display());
            for (name, role) in &root.roles {
                println!("  {name}: {} key(s), threshold {}", role.keyids.len(), role.threshold);
            }
            match status {
                Ok(()) => println!("fully signed"),
                Err(e) => println!(
                    "not yet valid: {e}
more holders sign with: flotilla trust sign {} --key KEY",
                    path.display()
                ),
            }
            Ok(())
        }
    }
}

pub fn keygen(prefix: &Path, out: Output) -> anyhow::Result<()> {
    let key = SecretKey::generate()?;
    let (k, p) = key
        .save(prefix)
        .with_context(|| format!("writing {}.key (an existing key is never overwritten)", prefix.display()))?;
    match out {
        Output::Json | Output::Yaml => output::json(&serde_json::json!({"key": k, "pub": p, "key_id": key.key_id().0})),
        Output::Table => {
            println!("wrote {} (secret, mode 0600) and {}", k.display(), p.display());
            println!("key id {}", key.key_id());
            Ok(())
        }
    }
}

pub fn trust(cmd: TrustCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    let now = crate::bundle::unix_now();
    match cmd {
        TrustCmd::Init { key, spec, out: path } => {
            let own = key.as_deref().map(SecretKey::load).transpose()?;
            let mut root_pubs = load_pubs(&spec.root_keys)?;
            let mut targets_pubs = load_pubs(&spec.targets_keys)?;
            let mut signers = load_secrets(&spec.sign_with)?;
            if let Some(k) = own {
                root_pubs.push(k.public());
                targets_pubs.push(k.public());
                signers.push(k);
            }
            anyhow::ensure!(
                !root_pubs.is_empty() && !targets_pubs.is_empty(),
                "a root needs keys: pass --key KEY, or --root-key PUB and --targets-key PUB (repeatable)"
            );
            let expires = spec.expires.as_deref().map(|e| crate::bundle::parse_time(e, now)).transpose()?;
            let mut root = Root {
                kind: flotilla_bundle::root::ROOT_TYPE.into(),
                schema: flotilla_bundle::root::ROOT_SCHEMA,
                version: 1,
                created: now,
                expires,
                keys: Default::default(),
                roles: Default::default(),
            };
            set_role(&mut root, "root", root_pubs, spec.root_threshold);
            set_role(&mut root, "targets", targets_pubs, spec.targets_threshold);
            write_root(&path, &root, &signers, None, out)
        }
        TrustCmd::Rotate { from, spec, out: path } => {
            let old_bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            let old = TrustedRoot::anchor(&old_bytes, now)
                .with_context(|| format!("{} is not a valid root", from.display()))?;
            let mut root = old.root().clone();
            root.version += 1;
            root.created = now;
            root.expires = spec.expires.as_deref().map(|e| crate::bundle::parse_time(e, now)).transpose()?;
            set_role(&mut root, "root", load_pubs(&spec.root_keys)?, spec.root_threshold);
            set_role(&mut root, "targets", load_pubs(&spec.targets_keys)?, spec.targets_threshold);
            prune_keys(&mut root);
            write_root(&path, &root, &load_secrets(&spec.sign_with)?, Some(&old), out)
        }
        TrustCmd::Sign { root, key } => {
            let bytes = std::fs::read(&root).with_context(|| format!("reading {}", root.display()))?;
            let key = SecretKey::load(&key)?;
            let signed = add_root_signature(&bytes, &key)?;
            std::fs::write(&root, &signed)?;
            match out {
                Output::Json | Output::Yaml => {
                    output::json(&serde_json::json!({"root": root, "key_id": key.key_id().0}))
                }
                Output::Table => {
                    println!("signed {} with key {}", root.display(), key.key_id());
                    Ok(())
                }
            }
        }
        TrustCmd::Verify { root, from } => {
            let bytes = std::fs::read(&root).with_context(|| format!("reading {}", root.display()))?;
            let verified = match &from {
                None => TrustedRoot::anchor(&bytes, now).context("root refused")?,
                Some(f) => {
                    let old = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                    let old = TrustedRoot::anchor(&old, now)
                        .with_context(|| format!("{} is not a valid root", f.display()))?;
                    old.rotate(&bytes, now).context("rotation refused")?
                }
            };
            let v = verified.root().version;
            match out {
                Output::Json | Output::Yaml => output::json(&serde_json::json!({"valid": true, "version": v})),
                Output::Table => {
                    match from {
                        Some(f) => println!("OK: {} (v{v}) is a valid rotation of {}", root.display(), f.display()),
                        None => println!("OK: {} (v{v}) is validly self-signed", root.display()),
                    }
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
                Output::Json | Output::Yaml => output::json(&view)?,
                Output::Table => println!("{}", serde_json::to_string_pretty(&view)?),
            }
            valid.map_err(anyhow::Error::msg)
        }
        TrustCmd::Push { root } => {
            let client = crate::client::Client::new(server)?;
            let bytes = std::fs::read(&root).with_context(|| format!("reading {}", root.display()))?;
            let r: flotilla_api::v1::TrustRootPushed = client.post_bytes("/api/v1/trust/root", bytes)?;
            match out {
                Output::Json | Output::Yaml => output::json(&r),
                Output::Table => {
                    println!("control plane now trusts root v{}; sent to {} device(s)", r.version, r.devices);
                    Ok(())
                }
            }
        }
    }
}
