//! `flotilla devices ...` and `flotilla rollout ...`.

use anyhow::Context;
use clap::Subcommand;
use flotilla_api::v1::{
    CredentialUpdate, Device, DeviceCredential, DriftAlert, DriftRow, Rollout, RolloutCreate, RolloutCreated,
    SampleRecord, SampleUploadDevice, SamplesPull, SamplesPulled, TagsUpdate,
};

use flotilla_rollout::{Gate, OnFailure, Plan, Wave};

use crate::client::Client;
use crate::output::{self, Output};

/// How a rollout proceeds: waves, bake, gates, what to do on failure (`rollout start`, and a
/// retraining policy's rollout).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct PlanArgs {
    /// Waves, cumulative: percentages (5%), device counts (10) or tag selectors
    /// (group=canary), comma-separated. Default: 100%.
    #[arg(long, value_name = "WAVES")]
    pub waves: Option<String>,
    /// How long each wave's devices run the new version before its gates are judged (30s,
    /// 10m).
    #[arg(long, value_name = "DURATION")]
    pub bake: Option<String>,
    /// A gate every wave must pass (repeatable): install_success>=0.95, self_test_pass>=1,
    /// error_rate<=0.01, latency_p95<=1.2x (vs the previous version) or <=80ms, psi<=0.2
    /// (also js, ks, wasserstein), accelerator_fallback<=0. Default: install_success>=1.
    #[arg(long = "gate", value_name = "GATE")]
    pub gates: Vec<String>,
    /// When a gate fails: pause (devices keep what they have) or rollback (updated devices
    /// go back to their previous version).
    #[arg(long, value_name = "POLICY", value_parser = ["pause", "rollback"])]
    pub on_failure: Option<String>,
    /// Devices that must report health on the new version before a health gate may pass.
    #[arg(long, value_name = "N")]
    pub min_reporting: Option<u32>,
    /// The whole plan as a TOML or JSON file (flags given too override it).
    #[arg(long, value_name = "FILE")]
    pub plan: Option<std::path::PathBuf>,
}

impl PlanArgs {
    /// The plan these flags describe, or None when none was given.
    pub fn plan(&self) -> anyhow::Result<Option<Plan>> {
        let given = self.waves.is_some()
            || self.bake.is_some()
            || !self.gates.is_empty()
            || self.on_failure.is_some()
            || self.min_reporting.is_some()
            || self.plan.is_some();
        if !given {
            return Ok(None);
        }
        let mut p = match &self.plan {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading plan {}: {e}", path.display()))?;
                if text.trim_start().starts_with('{') {
                    serde_json::from_str::<Plan>(&text)?
                } else {
                    toml::from_str::<Plan>(&text).map_err(|e| anyhow::anyhow!("plan {}: {e}", path.display()))?
                }
            }
            None => Plan { gates: vec![Gate::parse("install_success>=1")?], ..Plan::all_at_once() },
        };
        if let Some(w) = &self.waves {
            p.waves = Wave::parse_list(w)?;
        }
        if let Some(b) = &self.bake {
            p.bake_secs = crate::bundle::parse_duration(b)?.as_secs();
        }
        if !self.gates.is_empty() {
            p.gates = self.gates.iter().map(|g| Gate::parse(g)).collect::<Result<_, _>>()?;
        }
        if let Some(f) = self.on_failure.as_deref() {
            p.on_failure = if f == "rollback" { OnFailure::Rollback } else { OnFailure::Pause };
        }
        if let Some(n) = self.min_reporting {
            p.min_reporting = n;
        }
        p.validate()?;
        Ok(Some(p))
    }
}

#[derive(Subcommand, Debug)]
pub enum DevicesCmd {
    /// List registered devices.
    Ls {
        /// Only devices whose tags match, e.g. -l group=lab, -l 'group in (lab,field),!test'.
        #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
        selector: Option<String>,
        /// At most this many devices (by id); the cursor of the next page goes to stderr as the
        /// --after to continue with. Without it, every device.
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Continue after this cursor (what the previous page printed).
        #[arg(long, value_name = "CURSOR", requires = "limit")]
        after: Option<String>,
    },
    /// Set or remove tags of a device on the server (they win over the tags the device
    /// reports): `flotilla devices tag rpi-7 group=lab site=berlin`, `... tag rpi-7 site-`.
    Tag {
        id: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        tags: Vec<String>,
    },
    /// Enroll devices with the control plane from what `flotilla-image personalise` wrote:
    /// certs.csv (device_id,certificate_sha256,serial,not_after: the certificates go on record,
    /// so one can be revoked by serial) or enroll.csv (device_id,password_sha256; the hashes
    /// only, the passwords stay in the devices' images), or one device with --password-sha256.
    /// A plain-TCP server started with --require-device-password admits only enrolled devices.
    Enroll {
        /// One device's id (with --password-sha256).
        #[arg(required_unless_present = "file", conflicts_with = "file", requires = "password_sha256")]
        id: Option<String>,
        /// SHA-256 (hex) of that device's password.
        #[arg(long, value_name = "HEX")]
        password_sha256: Option<String>,
        /// CSV with a header naming the columns device_id and password_sha256.
        #[arg(long, value_name = "CSV")]
        file: Option<std::path::PathBuf>,
    },
    /// Forget a device's broker password (it can no longer join a server that requires one).
    Unenroll { id: String },
    /// Revoke a device: the broker refuses its certificates from now on (across restarts) and
    /// cuts its live connection at once. `devices certificate ID` or a claim token made for it
    /// admits it again with a new certificate.
    Revoke { id: String },
    /// Issue a certificate for a device: for its CSR (--csr FILE; the key stays where it was
    /// made), or with a key made by the server (written to --out PREFIX.key, mode 0600).
    /// Writes PREFIX.pem. Admits a revoked device again.
    Certificate {
        id: String,
        #[arg(long, value_name = "FILE")]
        csr: Option<std::path::PathBuf>,
        /// Write PREFIX.pem (and PREFIX.key without --csr).
        #[arg(long, value_name = "PREFIX")]
        out: std::path::PathBuf,
    },
    /// A device's certificates on record (serial, fingerprint, end, how it was issued, revoked).
    Certs { id: String },
    /// Single-use, expiring claim tokens for first-boot provisioning: the agent makes its key,
    /// sends a CSR with the token, and gets its certificate (the key never leaves the device).
    #[command(subcommand)]
    ClaimToken(ClaimTokenCmd),
}

#[derive(Subcommand, Debug)]
pub enum ClaimTokenCmd {
    /// Make a claim token; it is shown this once.
    Create {
        /// Only this device id may use it (needed to re-provision an enrolled or revoked device).
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        /// How long it stays usable, e.g. 15m, 1h, 7d (at most 30d).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
    },
    /// List claim tokens (never the secrets): when they end, whether and by whom they were used.
    Ls,
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected e.g. 15m, 1h, 7d"))?;
    match unit {
        "" | "s" => Ok(n),
        "m" => Ok(n * 60),
        "h" => Ok(n * 3600),
        "d" => Ok(n * 86_400),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (d, h, m or s)")),
    }
}

#[derive(Subcommand, Debug)]
pub enum DriftCmd {
    /// Drift per cohort, signal and window: live sketches merged over the cohort's devices and
    /// scored against the bundle's baseline (PSI, Jensen–Shannon distance, KS, Wasserstein-1).
    Show {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: Option<u64>,
        /// Only devices whose tags match, e.g. -l group=lab.
        #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
        selector: Option<String>,
        /// Tag whose values make the cohorts (default: the server's, `group`); `none` merges
        /// all selected devices into one.
        #[arg(long, value_name = "TAG")]
        by: Option<String>,
        /// Only the latest N windows.
        #[arg(long, value_name = "N")]
        last: Option<u32>,
        /// Only this signal (e.g. class, confidence, input.c0).
        #[arg(long)]
        signal: Option<String>,
    },
    /// Reservoir samples of inputs kept by devices for retraining (only when the bundle was
    /// built with --drift-sample N).
    #[command(subcommand)]
    Samples(SamplesCmd),
}

#[derive(Subcommand, Debug)]
pub enum SamplesCmd {
    /// Ask devices to upload their reservoir sample of a model; waits until they have.
    Pull {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: Option<u64>,
        /// Only devices whose tags match.
        #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
        selector: Option<String>,
        /// Give up waiting after this many seconds (the samples still arrive later).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Write the stored samples of a model as a JSON array of v2 infer requests, each with its
    /// `predicted` classes and feedback `labels` (usable as --golden or --baseline data).
    Export {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: Option<u64>,
        #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
        selector: Option<String>,
        /// Where to write (default: stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AlertsCmd {
    /// List drift alerts (firing ones; --all for resolved ones too).
    Ls {
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Start rolling a pushed bundle out and print its id.
    ///
    /// Without a plan: one wave of every device, paused if any install fails. With waves, each
    /// wave is offered once the one before it has installed, baked and passed every gate:
    ///
    ///   flotilla rollout start --bundle digits@2 --waves 5%,25%,100% --bake 10m \
    ///       --gate 'latency_p95<=1.2x' --gate 'error_rate<=0.01' --gate 'psi<=0.2' \
    ///       --on-failure rollback
    #[command(verbatim_doc_comment)]
    Start {
        /// NAME@VERSION of a pushed bundle.
        #[arg(long, value_name = "NAME@VERSION")]
        bundle: String,
        /// Limit to these devices (repeatable).
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
        /// Only devices whose tags (and facts: id, arch) match, e.g. -l 'arch=aarch64,group!=lab'.
        #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
        selector: Option<String>,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Show a rollout: state, reason, waves with their gates, and each device.
    Status { id: String },
    /// Follow a rollout's waves until it finishes, pauses or rolls back.
    Watch {
        id: String,
        /// Seconds between updates.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Stop offering the bundle; devices keep what they have.
    Pause { id: String },
    /// Continue a paused rollout (its current wave's gates are judged again after a bake).
    Resume { id: String },
    /// Stop the rollout for good.
    Abort { id: String },
    /// Start the next wave now, whatever the gates say.
    Promote { id: String },
    /// Send every device the rollout updated back to its previous version.
    Rollback { id: String },
    /// List rollouts.
    Ls,
}

pub fn devices(cmd: DevicesCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    match cmd {
        DevicesCmd::Enroll { id: None, password_sha256: None, file: Some(path) } if is_certs_csv(&path)? => {
            let mut done = Vec::new();
            for (id, rec) in read_certs_csv(&path)? {
                let c: flotilla_api::v1::DeviceCertificate = client
                    .post(&format!("/api/v1/devices/{}/certificates", enc(&id)), &rec)
                    .with_context(|| format!("enrolling {id}'s certificate"))?;
                done.push(c);
            }
            match out {
                Output::Json | Output::Yaml => output::json(&done),
                Output::Table => {
                    eprintln!("put {} device certificate(s) on record", done.len());
                    Ok(())
                }
            }
        }
        DevicesCmd::Enroll { id, password_sha256, file } => {
            let pairs = match (id, password_sha256, file) {
                (Some(id), Some(hash), None) => vec![(id, hash)],
                (None, None, Some(path)) => read_enroll_csv(&path)?,
                _ => anyhow::bail!("give a device id with --password-sha256, or --file enroll.csv"),
            };
            let mut done = Vec::new();
            for (id, hash) in pairs {
                let c: DeviceCredential = client
                    .put(
                        &format!("/api/v1/devices/{}/credential", enc(&id)),
                        &CredentialUpdate { password_sha256: hash },
                    )
                    .with_context(|| format!("enrolling {id}"))?;
                if !c.enforced && done.is_empty() {
                    eprintln!("note: the server uses an external broker, which checks passwords itself");
                }
                done.push(c);
            }
            match out {
                Output::Json | Output::Yaml => output::json(&done),
                Output::Table => {
                    eprintln!("enrolled {} device(s)", done.len());
                    Ok(())
                }
            }
        }
        DevicesCmd::Revoke { id } => {
            let r: flotilla_api::v1::DeviceRevoked =
                client.post(&format!("/api/v1/devices/{}/revoke", enc(&id)), &serde_json::json!({}))?;
            match out {
                Output::Json | Output::Yaml => output::json(&r),
                Output::Table => {
                    eprintln!(
                        "{}: revoked ({} certificate(s) on record refused, {} live connection(s) cut)",
                        r.device_id, r.certificates, r.disconnected
                    );
                    Ok(())
                }
            }
        }
        DevicesCmd::Certificate { id, csr, out: prefix } => {
            let csr = csr
                .map(|p| std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display())))
                .transpose()?;
            let c: flotilla_api::v1::DeviceCertificate = client.post(
                &format!("/api/v1/devices/{}/certificate", enc(&id)),
                &flotilla_api::v1::CertificateCreate { csr },
            )?;
            let pem = prefix.with_extension("pem");
            std::fs::write(&pem, c.certificate.as_deref().unwrap_or_default())
                .with_context(|| format!("writing {}", pem.display()))?;
            if let Some(key) = &c.key {
                let path = prefix.with_extension("key");
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                use std::io::Write;
                opts.open(&path)
                    .and_then(|mut f| f.write_all(key.as_bytes()))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            match out {
                Output::Json | Output::Yaml => output::json(&flotilla_api::v1::DeviceCertificate { key: None, ..c }),
                Output::Table => {
                    eprintln!("{}: certificate {} until {} in {}", c.device_id, c.serial, c.not_after, pem.display());
                    Ok(())
                }
            }
        }
        DevicesCmd::Certs { id } => {
            let certs: Vec<flotilla_api::v1::DeviceCertificate> =
                client.get(&format!("/api/v1/devices/{}/certificates", enc(&id)))?;
            match out {
                Output::Json | Output::Yaml => output::json(&certs),
                Output::Table => {
                    println!("{:<34}  {:<25}  {:<8}  {:<25}  SHA-256", "SERIAL", "NOT AFTER", "HOW", "REVOKED");
                    for c in certs {
                        println!(
                            "{:<34}  {:<25}  {:<8}  {:<25}  {}",
                            c.serial,
                            c.not_after,
                            c.how,
                            c.revoked.as_deref().unwrap_or("-"),
                            c.sha256
                        );
                    }
                    Ok(())
                }
            }
        }
        DevicesCmd::ClaimToken(ClaimTokenCmd::Create { device, ttl }) => {
            let t: flotilla_api::v1::ClaimToken = client.post(
                "/api/v1/claim-tokens",
                &flotilla_api::v1::ClaimTokenCreate { device_id: device, ttl_secs: Some(ttl) },
            )?;
            match out {
                Output::Json | Output::Yaml => output::json(&t),
                Output::Table => {
                    eprintln!("created {} (single use, until {}); the token is shown once:", t.id, t.expires);
                    println!("{}", t.token.unwrap_or_default());
                    Ok(())
                }
            }
        }
        DevicesCmd::ClaimToken(ClaimTokenCmd::Ls) => {
            let ts: Vec<flotilla_api::v1::ClaimToken> = client.get("/api/v1/claim-tokens")?;
            match out {
                Output::Json | Output::Yaml => output::json(&ts),
                Output::Table => {
                    for t in ts {
                        let used = match (&t.used, &t.used_by) {
                            (Some(at), Some(by)) => format!("used {at} by {by}"),
                            _ => "unused".into(),
                        };
                        println!(
                            "{}  for {:<16}  until {}  {used}",
                            t.id,
                            t.device_id.as_deref().unwrap_or("any device"),
                            t.expires
                        );
                    }
                    Ok(())
                }
            }
        }
        DevicesCmd::Unenroll { id } => {
            client.delete(&format!("/api/v1/devices/{}/credential", enc(&id)))?;
            eprintln!("{id}: credential forgotten");
            Ok(())
        }
        DevicesCmd::Tag { id, tags } => {
            let mut u = TagsUpdate::default();
            for t in &tags {
                if let Some(k) = t.strip_suffix('-').filter(|k| !k.contains('=')) {
                    u.remove.push(k.to_string());
                } else {
                    let (k, v) = flotilla_proto::tags::parse_tag(t).map_err(anyhow::Error::msg)?;
                    u.set.insert(k, v);
                }
            }
            let d: Device = client.post(&format!("/api/v1/devices/{}/tags", enc(&id)), &u)?;
            match out {
                Output::Json | Output::Yaml => output::json(&d),
                Output::Table => {
                    println!("{}: {}", d.id, tags_text(&d.tags));
                    Ok(())
                }
            }
        }
        DevicesCmd::Ls { selector, limit, after } => {
            let mut query = Vec::new();
            if let Some(s) = &selector {
                query.push(format!("selector={}", enc(s)));
            }
            if let Some(n) = limit {
                query.push(format!("limit={n}"));
            }
            if let Some(a) = &after {
                query.push(format!("after={}", enc(a)));
            }
            let path = format!("/api/v1/devices{}{}", if query.is_empty() { "" } else { "?" }, query.join("&"));
            let (list, next): (Vec<Device>, _) = client.get_page(&path)?;
            if let (Some(next), Some(n)) = (next, limit) {
                let sel = selector.as_ref().map(|s| format!(" -l '{s}'")).unwrap_or_default();
                eprintln!("more: flotilla devices ls{sel} --limit {n} --after {next}");
            }
            match out {
                Output::Json | Output::Yaml => output::json(&list),
                Output::Table => {
                    output::table(
                        &["ID", "ONLINE", "ARCH", "AGENT", "TAGS", "MODELS", "LAST SEEN"],
                        list.iter()
                            .map(|d| {
                                vec![
                                    d.id.clone(),
                                    if d.online { "yes".into() } else { "no".into() },
                                    d.arch.clone().unwrap_or_default(),
                                    d.agent_version.clone().unwrap_or_default(),
                                    tags_text(&d.tags),
                                    d.models
                                        .iter()
                                        .map(|m| format!("{}@{}", m.name, m.version))
                                        .collect::<Vec<_>>()
                                        .join(","),
                                    d.last_seen.clone().unwrap_or_default(),
                                ]
                            })
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
    }
}

/// (device_id, password_sha256) rows of an enroll.csv (a header names the columns).
/// A certs.csv (`flotilla-image personalise --fleet-ca`) rather than an enroll.csv.
fn is_certs_csv(path: &std::path::Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .is_some_and(|h| h.contains("certificate_sha256")))
}

fn read_certs_csv(path: &std::path::Path) -> anyhow::Result<Vec<(String, flotilla_api::v1::CertificateRecord)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let (_, header) = lines.next().with_context(|| format!("{} is empty", path.display()))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter().position(|c| *c == name).with_context(|| {
            format!(
                "{}: the header has no {name} column (want device_id,certificate_sha256,serial,not_after)",
                path.display()
            )
        })
    };
    let (i_id, i_sha, i_serial, i_end) =
        (col("device_id")?, col("certificate_sha256")?, col("serial")?, col("not_after")?);
    lines
        .map(|(n, l)| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            let bad = || anyhow::anyhow!("{}:{}: expected {} fields", path.display(), n + 1, cols.len());
            let get = |i: usize| f.get(i).copied().filter(|v| !v.is_empty()).ok_or_else(bad);
            let not_after = get(i_end)?
                .parse()
                .map_err(|_| anyhow::anyhow!("{}:{}: not_after is not a number", path.display(), n + 1))?;
            Ok((
                get(i_id)?.to_string(),
                flotilla_api::v1::CertificateRecord {
                    sha256: get(i_sha)?.into(),
                    serial: get(i_serial)?.into(),
                    not_after,
                },
            ))
        })
        .collect()
}

fn read_enroll_csv(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let (_, header) = lines.next().with_context(|| format!("{} is empty", path.display()))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter().position(|c| *c == name).with_context(|| {
            format!("{}: the header has no {name} column (want device_id,password_sha256)", path.display())
        })
    };
    let (i_id, i_hash) = (col("device_id")?, col("password_sha256")?);
    lines
        .map(|(n, l)| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            match (f.get(i_id), f.get(i_hash)) {
                (Some(id), Some(h)) if !id.is_empty() && !h.is_empty() => Ok((id.to_string(), h.to_string())),
                _ => anyhow::bail!("{}:{}: expected {} fields", path.display(), n + 1, cols.len()),
            }
        })
        .collect()
}

fn tags_text(t: &std::collections::BTreeMap<String, String>) -> String {
    t.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn num(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.3}"))
}

pub fn drift(cmd: DriftCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    match cmd {
        DriftCmd::Samples(c) => samples(&client, c, out),
        DriftCmd::Show { model, version, selector, by, last, signal } => {
            let mut q = format!("/api/v1/drift?model={}", enc(&model));
            if let Some(v) = version {
                q += &format!("&version={v}");
            }
            if let Some(s) = &selector {
                q += &format!("&selector={}", enc(s));
            }
            if let Some(b) = &by {
                q += &format!("&by={}", enc(b));
            }
            if let Some(n) = last {
                q += &format!("&last={n}");
            }
            let mut rows: Vec<DriftRow> = client.get(&q)?;
            if let Some(sig) = &signal {
                rows.retain(|r| &r.signal == sig);
            }
            match out {
                Output::Json | Output::Yaml => output::json(&rows),
                Output::Table => {
                    if rows.is_empty() {
                        println!(
                            "no drift reports for {model} yet (devices send one per window of the bundle's drift profile)"
                        );
                        return Ok(());
                    }
                    output::table(
                        &[
                            "VERSION",
                            "COHORT",
                            "SIGNAL",
                            "WINDOW END",
                            "COUNT",
                            "PSI",
                            "JS",
                            "KS",
                            "W1",
                            "MEAN",
                            "ALERT",
                        ],
                        rows.iter()
                            .map(|r| {
                                vec![
                                    r.version.to_string(),
                                    if r.cohort.is_empty() { "(all)".into() } else { r.cohort.clone() },
                                    r.signal.clone(),
                                    r.window_end.clone(),
                                    r.count.to_string(),
                                    num(r.psi),
                                    num(r.js),
                                    num(r.ks),
                                    num(r.wasserstein),
                                    num(r.mean),
                                    if r.alert {
                                        "ALERT".into()
                                    } else if !r.exceeded.is_empty() {
                                        format!("over: {}", r.exceeded.join(","))
                                    } else {
                                        String::new()
                                    },
                                ]
                            })
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
    }
}

fn samples(client: &Client, cmd: SamplesCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        SamplesCmd::Pull { model, version, selector, timeout } => {
            let pulled: SamplesPulled =
                client.post("/api/v1/samples/pull", &SamplesPull { model: model.clone(), version, selector })?;
            let started = std::time::Instant::now();
            let status = loop {
                let status: Vec<SampleUploadDevice> =
                    client.get(&format!("/api/v1/samples/uploads/{}", pulled.upload_id))?;
                if status.iter().all(|d| d.done) || started.elapsed().as_secs() >= timeout {
                    break status;
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            };
            match out {
                Output::Json | Output::Yaml => {
                    output::json(&serde_json::json!({"upload_id": pulled.upload_id, "devices": status}))
                }
                Output::Table => {
                    output::table(
                        &["DEVICE", "SAMPLES", "DONE"],
                        status
                            .iter()
                            .map(|d| {
                                vec![d.device.clone(), d.samples.to_string(), if d.done { "yes" } else { "no" }.into()]
                            })
                            .collect(),
                    );
                    println!("next: flotilla drift samples export --model {model} --out samples.json");
                    Ok(())
                }
            }
        }
        SamplesCmd::Export { model, version, selector, out: path } => {
            let mut q = format!("/api/v1/samples?model={}", enc(&model));
            if let Some(v) = version {
                q += &format!("&version={v}");
            }
            if let Some(s) = &selector {
                q += &format!("&selector={}", enc(s));
            }
            let records: Vec<SampleRecord> = client.get(&q)?;
            let text = serde_json::to_string_pretty(&records)?;
            match path {
                Some(p) => {
                    std::fs::write(&p, text)?;
                    eprintln!("wrote {} samples to {}", records.len(), p.display());
                }
                None => println!("{text}"),
            }
            Ok(())
        }
    }
}

pub fn alerts(cmd: AlertsCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    match cmd {
        AlertsCmd::Ls { all } => {
            let list: Vec<DriftAlert> = client.get(if all { "/api/v1/alerts?all=true" } else { "/api/v1/alerts" })?;
            match out {
                Output::Json | Output::Yaml => output::json(&list),
                Output::Table => {
                    output::table(
                        &[
                            "ID",
                            "STATE",
                            "MODEL",
                            "COHORT",
                            "SIGNAL",
                            "METRIC",
                            "VALUE",
                            "THRESHOLD",
                            "WINDOWS",
                            "SINCE",
                        ],
                        list.iter()
                            .map(|a| {
                                vec![
                                    a.id.to_string(),
                                    a.state.clone(),
                                    format!("{}@{}", a.model, a.version),
                                    if a.cohort.is_empty() { "(all)".into() } else { a.cohort.clone() },
                                    a.signal.clone(),
                                    a.metrics.join(","),
                                    num(a.value),
                                    num(a.threshold),
                                    a.windows.to_string(),
                                    a.first_window.clone(),
                                ]
                            })
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
    }
}

/// `rollout watch` on a terminal: a bar per wave (devices succeeded of its size) under a status
/// line, redrawn in place.
fn watch_bars(client: &Client, id: &str, interval: f64) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let mp = MultiProgress::new();
    let head = mp.add(ProgressBar::new_spinner());
    head.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"));
    let style = ProgressStyle::with_template("  wave {prefix:<10} [{bar:30}] {pos}/{len} {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let mut bars: Vec<ProgressBar> = Vec::new();
    loop {
        let r: Rollout = client.get(&format!("/api/v1/rollouts/{id}"))?;
        head.set_message(progress_line(&r));
        head.tick();
        for (i, w) in r.waves.iter().enumerate() {
            if bars.len() <= i {
                let b = mp.add(ProgressBar::new(w.size));
                b.set_style(style.clone());
                b.set_prefix(format!("{} ({})", i + 1, w.spec));
                bars.push(b);
            }
            let gates: Vec<String> =
                w.gates.iter().map(|g| format!("{}{}", if g.passed { "✔ " } else { "✘ " }, g.name)).collect();
            bars[i].set_length(w.size.max(1));
            bars[i].set_position(w.succeeded);
            bars[i].set_message(format!(
                "{} {}{}",
                w.status,
                if w.failed > 0 { format!("{} failed ", w.failed) } else { String::new() },
                gates.join(" ")
            ));
        }
        if r.state != "running" && r.state != "pending" {
            head.finish();
            for b in &bars {
                b.finish();
            }
            if let Some(why) = &r.reason {
                println!("reason: {why}");
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(interval.max(0.1)));
    }
}

fn progress_line(r: &Rollout) -> String {
    let waves: Vec<String> = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| format!("w{}[{} {}/{} ok {} failed]", i + 1, w.status, w.succeeded, w.size, w.failed))
        .collect();
    format!("{} {} wave {}/{}  {}", r.id, r.state, r.current_wave, r.waves.len(), waves.join("  "))
}

pub fn rollout(cmd: RolloutCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    let command = match &cmd {
        RolloutCmd::Pause { id } => Some((id.clone(), "pause")),
        RolloutCmd::Resume { id } => Some((id.clone(), "resume")),
        RolloutCmd::Abort { id } => Some((id.clone(), "abort")),
        RolloutCmd::Promote { id } => Some((id.clone(), "promote")),
        RolloutCmd::Rollback { id } => Some((id.clone(), "rollback")),
        _ => None,
    };
    if let Some((id, verb)) = command {
        let r: Rollout = client.post(&format!("/api/v1/rollouts/{id}/{verb}"), &serde_json::json!({}))?;
        return match out {
            Output::Json | Output::Yaml => output::json(&r),
            Output::Table => {
                println!("{}", progress_line(&r));
                Ok(())
            }
        };
    }
    match cmd {
        RolloutCmd::Start { bundle, devices, selector, plan } => {
            let mut p = match plan.plan()? {
                Some(p) => p,
                None => Plan { gates: vec![Gate::parse("install_success>=1")?], ..Plan::all_at_once() },
            };
            if let Some(sel) = selector {
                p.target = sel;
            }
            p.validate()?;
            let req = RolloutCreate { bundle, devices, plan: Some(serde_json::to_value(&p)?) };
            let created: RolloutCreated = client.post("/api/v1/rollouts", &req)?;
            match out {
                Output::Json | Output::Yaml => output::json(&created),
                Output::Table => {
                    println!("{}", created.id);
                    Ok(())
                }
            }
        }
        RolloutCmd::Pause { .. }
        | RolloutCmd::Resume { .. }
        | RolloutCmd::Abort { .. }
        | RolloutCmd::Promote { .. }
        | RolloutCmd::Rollback { .. } => unreachable!("commands are sent above"),
        RolloutCmd::Watch { id, interval } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                return watch_bars(&client, &id, interval);
            }
            let mut last = String::new();
            loop {
                let r: Rollout = client.get(&format!("/api/v1/rollouts/{id}"))?;
                let line = progress_line(&r);
                if line != last {
                    println!("{line}");
                    last = line;
                }
                if r.state != "running" && r.state != "pending" {
                    if let Some(why) = &r.reason {
                        println!("reason: {why}");
                    }
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_secs_f64(interval.max(0.1)));
            }
        }
        RolloutCmd::Status { id } => {
            let r: Rollout = client.get(&format!("/api/v1/rollouts/{id}"))?;
            match out {
                Output::Json | Output::Yaml => output::json(&r),
                Output::Table => {
                    println!(
                        "rollout {} of {}: {} at wave {} of {} ({} of {} succeeded, {} failed, {} in progress)",
                        r.id,
                        r.bundle,
                        r.state,
                        r.current_wave,
                        r.waves.len(),
                        r.succeeded,
                        r.total,
                        r.failed,
                        r.offered + r.pending
                    );
                    if let Some(why) = &r.reason {
                        println!("reason: {why}");
                    }
                    output::table(
                        &["WAVE", "SPEC", "STATUS", "SIZE", "OFFERED", "SUCCEEDED", "FAILED", "GATES"],
                        r.waves
                            .iter()
                            .enumerate()
                            .map(|(i, w)| {
                                vec![
                                    (i + 1).to_string(),
                                    w.spec.clone(),
                                    w.status.clone(),
                                    w.size.to_string(),
                                    w.offered.to_string(),
                                    w.succeeded.to_string(),
                                    w.failed.to_string(),
                                    w.gates
                                        .iter()
                                        .map(|g| {
                                            format!(
                                                "{} {} ({})",
                                                if g.passed { "✓" } else { "·" },
                                                g.name,
                                                g.value.map_or("no data".into(), |v| format!("{v:.3}"))
                                            )
                                        })
                                        .collect::<Vec<_>>()
                                        .join("; "),
                                ]
                            })
                            .collect(),
                    );
                    println!();
                    output::table(
                        &["DEVICE", "STATE", "REASON"],
                        r.devices
                            .iter()
                            .map(|d| vec![d.device.clone(), d.state.clone(), d.reason.clone().unwrap_or_default()])
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
        RolloutCmd::Ls => {
            let list: Vec<Rollout> = client.get("/api/v1/rollouts")?;
            match out {
                Output::Json | Output::Yaml => output::json(&list),
                Output::Table => {
                    output::table(
                        &["ID", "BUNDLE", "STATE", "SUCCEEDED", "FAILED", "TOTAL", "CREATED"],
                        list.iter()
                            .map(|r| {
                                vec![
                                    r.id.clone(),
                                    r.bundle.clone(),
                                    r.state.clone(),
                                    r.succeeded.to_string(),
                                    r.failed.to_string(),
                                    r.total.to_string(),
                                    r.created.clone(),
                                ]
                            })
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
    }
}
