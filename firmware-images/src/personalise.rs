//! `flotilla-image personalise` and `inspect`: per-device identity in a copy of a built image.
//!
//! Each device gets one of three identities, written only into that device's image:
//!
//! - with `--fleet-ca DIR` (a TLS fleet): a fresh key made here and a certificate the fleet CA
//!   signs for the device id (`/etc/flotilla/device.key`, mode 0600, and `device.pem`); the
//!   enroll file (`certs.csv`) lists each certificate's fingerprint and serial for
//!   `flotilla devices enroll --file`, so the registry knows them (revocation by serial);
//! - with `--claim-token` (a TLS fleet, one device): a single-use claim token; the device makes
//!   its key on first boot and claims its certificate (the key never leaves it);
//! - otherwise (a plain-TCP fleet or a broker without client certificates): a fresh 256-bit
//!   broker password; the enroll file gets its SHA-256.
//!
//! `/etc/flotilla/identity.toml` (mode 0600) names the device and what it holds. Nothing here
//! prints, logs or keeps a key or a password anywhere else.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::build::{CERT_PATH, CONFIG_PATH, IDENTITY_PATH, KEY_PATH, RECORD_PATH};
use crate::disk::{self, Ext4};

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("who").required(true).args(["device_id", "csv"]))]
pub struct PersonaliseArgs {
    /// The built image (left unchanged).
    image: PathBuf,
    /// One device's id (1-64 of A-Z a-z 0-9 . _ -), with --out.
    #[arg(long, value_name = "ID", requires = "out")]
    device_id: Option<String>,
    /// This device's tags, KEY=VALUE (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE", requires = "device_id")]
    tags: Vec<String>,
    /// Where this device's image goes.
    #[arg(long, short, value_name = "IMAGE", conflicts_with = "csv")]
    out: Option<PathBuf>,
    /// Many devices: a CSV whose header names a device_id column; every other column is a tag
    /// (header = key; empty cells are skipped). Writes OUT_DIR/DEVICE_ID.img for each row.
    #[arg(long, value_name = "CSV", requires = "out_dir")]
    csv: Option<PathBuf>,
    /// Where the CSV's images go.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// The enroll file to append rows to: device_id,password_sha256 (enroll.csv next to the
    /// images by default), or with --fleet-ca device_id,certificate_sha256,serial,not_after
    /// (certs.csv by default).
    #[arg(long, value_name = "CSV")]
    enroll_file: Option<PathBuf>,
    /// Give each device a key and a certificate from the fleet CA in DIR (the control plane's
    /// DATA_DIR/pki: ca.pem and ca.key; or an operator's intermediate CA). For images built
    /// with an mqtts:// broker and --ca.
    #[arg(long, value_name = "DIR", conflicts_with = "claim_token")]
    fleet_ca: Option<PathBuf>,
    /// Days the device certificates are valid (agents renew a third before the end).
    #[arg(long, value_name = "DAYS", default_value_t = 365, requires = "fleet_ca")]
    cert_days: u32,
    /// Instead of a certificate, a single-use claim token (`flotilla devices claim-token create
    /// --device ID`): the device makes its key on first boot and claims its certificate from
    /// the image's claim_url (`flotilla-image build --claim-url`).
    #[arg(long, value_name = "TOKEN", requires = "device_id")]
    claim_token: Option<String>,
    /// Replace existing output images.
    #[arg(long)]
    force: bool,
}

#[derive(Serialize)]
struct Identity<'a> {
    device_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    claim_token: Option<&'a str>,
    tags: &'a BTreeMap<String, String>,
}

struct Device {
    id: String,
    tags: BTreeMap<String, String>,
    out: PathBuf,
}

pub fn run(a: PersonaliseArgs) -> anyhow::Result<()> {
    let devices = match (&a.device_id, &a.csv) {
        (Some(id), None) => {
            let mut tags = BTreeMap::new();
            for t in &a.tags {
                let (k, v) = flotilla_proto::tags::parse_tag(t).map_err(|e| anyhow::anyhow!("--tag: {e}"))?;
                tags.insert(k, v);
            }
            vec![Device { id: id.clone(), tags, out: a.out.clone().expect("clap: --out") }]
        }
        (None, Some(csv)) => read_csv(csv, a.out_dir.as_deref().expect("clap: --out-dir"))?,
        _ => bail!("give --device-id ID --out IMAGE, or --csv FILE --out-dir DIR"),
    };
    // Check everything before writing anything.
    let mut ids = BTreeSet::new();
    for d in &devices {
        if flotilla_proto::reserved_id(&d.id) {
            bail!("device id {:?} is reserved for the control plane (ids may not begin with flotilla-server)", d.id);
        }
        if !flotilla_proto::valid_device_id(&d.id) {
            bail!("device id {:?} is invalid: use 1-64 of A-Z a-z 0-9 . _ -", d.id);
        }
        if !ids.insert(d.id.as_str()) {
            bail!("device id {:?} appears twice", d.id);
        }
        if d.out.exists() && !a.force {
            bail!("{} exists (--force replaces it)", d.out.display());
        }
        if std::fs::canonicalize(&d.out).ok() == std::fs::canonicalize(&a.image).ok() {
            bail!("{} is the base image; personalise writes copies", d.out.display());
        }
    }
    let base = Ext4::open(&a.image)?;
    if base.read(CONFIG_PATH)?.is_none() {
        bail!("{} holds no {CONFIG_PATH}: build it with flotilla-image build", a.image.display());
    }
    if base.exists(IDENTITY_PATH)? {
        bail!("{} is already personalised (it has {IDENTITY_PATH}); start from the built image", a.image.display());
    }
    let config = String::from_utf8_lossy(&base.read(CONFIG_PATH)?.unwrap_or_default()).into_owned();
    let config: toml::Table = toml::from_str(&config).context("parsing the image's agent.toml")?;
    let ca = match &a.fleet_ca {
        Some(dir) => {
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()))
            };
            let ca = flotilla_pki::Ca::load(&read("ca.pem")?, &read("ca.key")?)
                .with_context(|| format!("the fleet CA in {}", dir.display()))?;
            if !config.contains_key("ca") {
                bail!("{} trusts no fleet CA: build it with --broker mqtts://… --ca", a.image.display());
            }
            Some(ca)
        }
        None => None,
    };
    if a.claim_token.is_some() && !config.contains_key("claim_url") {
        bail!("{} has no claim_url: build it with --claim-url https://CONTROL-PLANE:PORT", a.image.display());
    }
    let (default_enroll, header) = match &ca {
        Some(_) => ("certs.csv", "device_id,certificate_sha256,serial,not_after\n"),
        None => ("enroll.csv", "device_id,password_sha256\n"),
    };
    let enroll = a.enroll_file.clone().unwrap_or_else(|| {
        let dir = devices[0].out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        dir.join(default_enroll)
    });
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let mut enroll_rows = String::new();
    for (i, d) in devices.iter().enumerate() {
        if let Some(dir) = d.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        disk::copy_image(&a.image, &d.out)?;
        let fs = Ext4::open(&d.out)?;
        let mut id = Identity {
            device_id: &d.id,
            password: None,
            cert: None,
            key: None,
            claim_token: a.claim_token.as_deref(),
            tags: &d.tags,
        };
        let password;
        match &ca {
            Some(ca) => {
                let ident = ca.device(&d.id, now, a.cert_days as i64 * 86_400)?;
                let info = flotilla_pki::parse_cert(&ident.cert_pem)?;
                fs.write(KEY_PATH, ident.key_pem.as_bytes(), 0o600)
                    .with_context(|| format!("personalising {}", d.out.display()))?;
                fs.write(CERT_PATH, ident.cert_pem.as_bytes(), 0o644)?;
                id.cert = Some(CERT_PATH);
                id.key = Some(KEY_PATH);
                enroll_rows += &format!("{},{},{},{}\n", d.id, info.sha256, info.serial, info.not_after);
            }
            None if a.claim_token.is_some() => {}
            None => {
                password = new_password()?;
                id.password = Some(&password);
                enroll_rows += &format!("{},{}\n", d.id, hex::encode(Sha256::digest(password.as_bytes())));
            }
        }
        let text = format!(
            "# This device's identity, written by flotilla-image personalise. Keep it secret.\n{}",
            toml::to_string(&id)?
        );
        fs.write(IDENTITY_PATH, text.as_bytes(), 0o600)
            .with_context(|| format!("personalising {}", d.out.display()))?;
        eprintln!("[{}/{}] {} -> {}", i + 1, devices.len(), d.id, d.out.display());
    }
    if enroll_rows.is_empty() {
        eprintln!("{} device image(s) written; each claims its certificate on first boot.", devices.len());
        return Ok(());
    }
    append_enroll(&enroll, header, &enroll_rows)?;
    let what = if ca.is_some() { "certificate fingerprints" } else { "password hashes" };
    eprintln!(
        "{} device image(s) written; their {what} are in {}.\nnext: flotilla devices enroll --file {}",
        devices.len(),
        enroll.display(),
        enroll.display()
    );
    Ok(())
}

/// 32 random bytes as 64 hex digits.
fn new_password() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(b))
}

fn append_enroll(path: &Path, header: &str, rows: &str) -> anyhow::Result<()> {
    let new = !path.exists();
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| format!("opening {}", path.display()))?;
    if new {
        f.write_all(header.as_bytes())?;
    } else {
        let have = std::fs::read_to_string(path)?;
        if have.lines().next().map(|l| format!("{l}\n")).as_deref() != Some(header) {
            bail!("{} holds other columns than {}; give another --enroll-file", path.display(), header.trim());
        }
    }
    f.write_all(rows.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn read_csv(path: &Path, out_dir: &Path) -> anyhow::Result<Vec<Device>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (_, header) = rows.next().with_context(|| format!("{} is empty", path.display()))?;
    let cols: Vec<String> = header.split(',').map(|c| c.trim().to_string()).collect();
    let id_col = cols
        .iter()
        .position(|c| c == "device_id")
        .with_context(|| format!("{}: the header has no device_id column", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in rows {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != cols.len() {
            bail!("{}:{}: {} fields, the header has {}", path.display(), n + 1, cells.len(), cols.len());
        }
        let mut tags = BTreeMap::new();
        for (i, (k, v)) in cols.iter().zip(&cells).enumerate() {
            if i == id_col || v.is_empty() {
                continue;
            }
            let (k, v) = flotilla_proto::tags::parse_tag(&format!("{k}={v}"))
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
            tags.insert(k, v);
        }
        let id = cells[id_col].to_string();
        out.push(Device { out: out_dir.join(format!("{id}.img")), id, tags });
    }
    if out.is_empty() {
        bail!("{} has no devices", path.display());
    }
    Ok(out)
}

pub fn inspect(image: &Path, json: bool) -> anyhow::Result<()> {
    let fs = Ext4::open(image)?;
    let text = |p: &str| -> anyhow::Result<Option<String>> {
        Ok(fs.read(p)?.map(|b| String::from_utf8_lossy(&b).into_owned()))
    };
    let record: Option<serde_json::Value> = text(RECORD_PATH)?.map(|t| serde_json::from_str(&t)).transpose()?;
    let config = text(CONFIG_PATH)?;
    let identity = match text(IDENTITY_PATH)? {
        Some(t) => {
            let v: toml::Table = toml::from_str(&t).context("parsing the identity")?;
            let password = v.get("password").and_then(|p| p.as_str());
            let cert = text(CERT_PATH)?.and_then(|pem| flotilla_pki::parse_cert(&pem).ok());
            Some(serde_json::json!({
                "device_id": v.get("device_id").and_then(|d| d.as_str()),
                "tags": v.get("tags").map(serde_json::to_value).transpose()?,
                "password_sha256": password.map(|p| hex::encode(Sha256::digest(p.as_bytes()))),
                "certificate": cert.map(|c| serde_json::json!({
                    "subject": c.common_name, "serial": c.serial, "sha256": c.sha256, "not_after": c.not_after,
                })),
                "claim_token": v.get("claim_token").map(|_| "<set>"),
            }))
        }
        None => None,
    };
    if json {
        let v = serde_json::json!({
            "image": image,
            "root_offset": disk::root_offset(image)?,
            "record": record,
            "config": config,
            "identity": identity,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("image: {} (root partition at byte {})", image.display(), disk::root_offset(image)?);
    match &record {
        Some(r) => println!("built: {}", serde_json::to_string_pretty(r)?),
        None => println!("built: no {RECORD_PATH}"),
    }
    println!("{CONFIG_PATH}:\n{}", config.as_deref().unwrap_or("(missing)\n").trim_end());
    match identity {
        Some(i) => println!("identity: {}", serde_json::to_string_pretty(&i)?),
        None => println!("identity: not personalised"),
    }
    Ok(())
}
