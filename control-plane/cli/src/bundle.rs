//! `flotilla bundle ...`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use flotilla_builder::{BuildOptions, build, golden, parse_input_shape, signature};
use flotilla_bundle::format::{extract_artifact, read_envelope};
use flotilla_bundle::manifest::Role;
use flotilla_bundle::verify::decode_manifest;
use flotilla_bundle::{SecretKey, TrustedRoot};

use crate::client::Client;
use crate::output::{self, Output};

// Parsed once per run: the size of the `build` variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum BundleCmd {
    /// Build an unsigned bundle from a model file (ONNX or TFLite, told apart by content, not
    /// name). Records the model's inputs and outputs; symbolic dimensions (e.g. batch N) stay
    /// symbolic unless pinned. Golden outputs come from tract, or from the TFLite library at
    /// $FLOTILLA_TFLITE_LIB for TFLite models when it is set.
    Build {
        #[arg(long)]
        name: String,
        /// Monotonic version number (devices refuse to go below the highest they accepted).
        #[arg(long)]
        version: u64,
        #[arg(long, value_name = "FILE")]
        model: PathBuf,
        /// Pin an input's shape, e.g. --input-shape input=1,24,24,3 (repeatable).
        #[arg(long = "input-shape", value_name = "NAME=D1,D2,..")]
        input_shapes: Vec<String>,
        /// Golden cases (a v2 infer request as JSON, a JSON array of them, or .npy for a
        /// single-input model). Outputs are computed now by the reference CPU kernels, or, when
        /// a JSON case carries `"outputs"` (v2 response form, e.g. from onnxruntime in your
        /// training pipeline), taken as given: then a runtime that computes the model wrongly
        /// is caught. Every device checks them before activation. Repeatable.
        #[arg(long, value_name = "FILE")]
        golden: Vec<PathBuf>,
        /// Largest allowed difference between golden and device outputs.
        #[arg(long, default_value_t = 1e-4)]
        golden_tolerance: f64,
        /// Median self-test latency budget on the device, e.g. 50ms.
        #[arg(long, value_name = "DURATION")]
        latency_budget: Option<String>,
        /// Bake period after activation, e.g. 10m: the device watches the model this long
        /// (rolling back by itself when a threshold below is crossed) before it counts as good
        /// and the version before it may be pruned.
        #[arg(long, value_name = "DURATION")]
        bake: Option<String>,
        /// During the bake, roll back when more than this share of inferences fail (e.g. 0.05).
        #[arg(long, value_name = "RATIO")]
        max_error_rate: Option<f64>,
        /// During the bake, roll back when the p95 inference latency exceeds this (e.g. 80ms).
        #[arg(long, value_name = "DURATION")]
        max_latency_p95: Option<String>,
        /// Backend preference, best first (repeatable): tract-onnx, tract-tflite, tflite.
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// TFLite delegate for the devices: `xnnpack`, or a name the agents' config maps to a
        /// delegate library (e.g. an NPU's). Without --accelerator-required, a device that
        /// cannot apply it runs on the CPU and says so.
        #[arg(long, value_name = "NAME")]
        delegate: Option<String>,
        /// Running without the --delegate is a failed install, never a silent CPU fallback.
        #[arg(long, requires = "delegate")]
        accelerator_required: bool,
        /// Interpreter threads on the device (default: the runtime's).
        #[arg(long)]
        threads: Option<u32>,
        /// Expiry: RFC 3339 time or a duration from now (30d, 12h).
        #[arg(long)]
        expires: Option<String>,
        /// Store the model as a zstd patch against the model in OLD.flb (a delta update: a
        /// device that holds that model downloads only the difference). The bundle also carries
        /// the full model, fetched only by devices without the base (see --delta-only).
        #[arg(long, value_name = "OLD.flb")]
        delta_from: Option<PathBuf>,
        /// With --delta-from: leave the full model out (smaller file; devices without the base
        /// refuse the bundle with a clear reason).
        #[arg(long, requires = "delta_from")]
        delta_only: bool,
        #[arg(long, value_name = "B.flb")]
        out: PathBuf,
    },
    /// Add your signature to a bundle (in place unless --out). Several key holders can sign in
    /// turn; the secret key never leaves this machine.
    Sign {
        bundle: PathBuf,
        #[arg(long, value_name = "PREFIX.key")]
        key: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify signatures against a trust root and every artifact's digests. Exits non-zero
    /// when the bundle would be refused by a device.
    Verify {
        bundle: PathBuf,
        #[arg(long, value_name = "ROOT")]
        trust_root: PathBuf,
    },
    /// Show a bundle's manifest and signatures (no trust decision).
    Inspect { bundle: PathBuf },
    /// Upload a bundle to the control plane.
    Push { bundle: PathBuf },
    /// List bundles on the control plane.
    Ls,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// RFC 3339 time, or a duration from `now` such as `90s`, `15m`, `12h`, `30d`.
pub fn parse_time(s: &str, now: u64) -> anyhow::Result<u64> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return u64::try_from(t.unix_timestamp()).context("time before 1970");
    }
    Ok(now + parse_duration(s)?.as_secs())
}

pub fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 =
        num.parse().with_context(|| format!("{s:?}: expected a number with a unit, e.g. 50ms, 30s, 12h, 30d"))?;
    let secs = match unit {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => bail!("{s:?}: unknown unit {other:?} (use us, ms, s, m, h, d)"),
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}

pub fn run(cmd: BundleCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    match cmd {
        BundleCmd::Build {
            name,
            version,
            model,
            input_shapes,
            golden: golden_files,
            golden_tolerance,
            latency_budget,
            bake,
            max_error_rate,
            max_latency_p95,
            backends,
            delegate,
            accelerator_required,
            threads,
            expires,
            delta_from,
            delta_only,
            out: path,
        } => {
            let bytes = std::fs::read(&model).with_context(|| format!("reading model {}", model.display()))?;
            let now = unix_now();
            let mut opts = BuildOptions::new(&name, version, bytes, now);
            opts.input_shapes =
                input_shapes.iter().map(|s| parse_input_shape(s)).collect::<Result<BTreeMap<_, _>, _>>()?;
            opts.golden_tolerance = golden_tolerance;
            opts.latency_budget_us =
                latency_budget.map(|l| parse_duration(&l).map(|d| d.as_micros() as u64)).transpose()?;
            opts.bake_secs = bake.map(|b| parse_duration(&b).map(|d| d.as_secs())).transpose()?;
            if let Some(r) = max_error_rate {
                anyhow::ensure!((0.0..=1.0).contains(&r), "--max-error-rate {r}: expected a ratio between 0 and 1");
            }
            opts.max_error_rate = max_error_rate;
            opts.max_latency_p95_us =
                max_latency_p95.map(|l| parse_duration(&l).map(|d| d.as_micros() as u64)).transpose()?;
            opts.backends = backends;
            opts.delegate = delegate;
            opts.accelerator_required = accelerator_required;
            opts.threads = threads;
            opts.expires = expires.map(|e| parse_time(&e, now)).transpose()?;
            opts.delta_only = delta_only;
            if let Some(old) = &delta_from {
                let old_bytes = std::fs::read(old).with_context(|| format!("reading {}", old.display()))?;
                opts.delta_base =
                    Some(flotilla_builder::model_of(&old_bytes).with_context(|| format!("base {}", old.display()))?);
            }
            let sig = signature(&opts)?;
            for g in &golden_files {
                for (inputs, expected) in golden::read(g, &sig)? {
                    match expected {
                        Some(outputs) => opts.golden_reference.push((inputs, outputs)),
                        None => opts.golden.push(inputs),
                    }
                }
            }
            let built = build(&opts)?;
            for w in &built.warnings {
                eprintln!("warning: {w}");
            }
            std::fs::write(&path, &built.bytes).with_context(|| format!("writing {}", path.display()))?;
            let m = &built.manifest;
            match out {
                Output::Json => output::json(&serde_json::json!({
                    "bundle": path, "name": m.name, "version": m.version, "size": built.bytes.len(),
                    "golden_cases": opts.golden.len() + opts.golden_reference.len(), "warnings": built.warnings, "signed": false, "delta": opts.delta_base.is_some(),
                })),
                Output::Table => {
                    println!(
                        "built {}@{} → {} ({} bytes, unsigned)",
                        m.name,
                        m.version,
                        path.display(),
                        built.bytes.len()
                    );
                    for t in &m.model.inputs {
                        println!("  input  {} {} [{}]", t.name, t.dtype.as_str(), dims(&t.shape));
                    }
                    for t in &m.model.outputs {
                        println!("  output {} {} [{}]", t.name, t.dtype.as_str(), dims(&t.shape));
                    }
                    println!("  golden cases: {}", opts.golden.len() + opts.golden_reference.len());
                    if let Some(a) = m.artifact(flotilla_bundle::manifest::Role::Model)
                        && let flotilla_bundle::manifest::Encoding::ZstdPatch { base_sha256 } = &a.encoding
                    {
                        println!(
                            "  model stored as a delta: {} bytes for {} (base {})",
                            a.stored_size,
                            a.size,
                            &base_sha256[..12]
                        );
                    }
                    println!("next: flotilla bundle sign {} --key KEY.key", path.display());
                    Ok(())
                }
            }
        }
        BundleCmd::Sign { bundle, key, out: dest } => {
            let key = SecretKey::load(&key)?;
            let dest = dest.unwrap_or_else(|| bundle.clone());
            let tmp = dest.with_extension("flb.signing");
            let manifest = {
                let mut input = std::io::BufReader::new(
                    std::fs::File::open(&bundle).with_context(|| format!("opening {}", bundle.display()))?,
                );
                let mut w = std::io::BufWriter::new(
                    std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
                );
                let m = flotilla_bundle::writer::sign_bundle(&mut input, &key, &mut w)?;
                std::io::Write::flush(&mut w)?;
                m
            };
            std::fs::rename(&tmp, &dest)?;
            match out {
                Output::Json => output::json(&serde_json::json!({"bundle": dest, "key_id": key.key_id().0})),
                Output::Table => {
                    println!(
                        "signed {}@{} with key {} → {}",
                        manifest.name,
                        manifest.version,
                        key.key_id(),
                        dest.display()
                    );
                    Ok(())
                }
            }
        }
        BundleCmd::Verify { bundle, trust_root } => {
            let root_bytes = std::fs::read(&trust_root).with_context(|| format!("reading {}", trust_root.display()))?;
            let root = TrustedRoot::anchor(&root_bytes, unix_now()).context("the trust root itself is not valid")?;
            let mut f = std::fs::File::open(&bundle).with_context(|| format!("opening {}", bundle.display()))?;
            let (doc, data_offset) = read_envelope(&mut f)?;
            let verified = root.verify_manifest(&doc, unix_now()).context("bundle refused")?;
            for a in &verified.manifest.artifacts {
                let base = match &a.encoding {
                    flotilla_bundle::manifest::Encoding::ZstdPatch { .. } => {
                        println!(
                            "artifact {:?} is a delta: its content digest is checked on the device that holds the base",
                            a.name
                        );
                        continue;
                    }
                    _ => None,
                };
                extract_artifact(&mut f, data_offset, a, base, std::io::sink()).context("bundle refused")?;
            }
            let m = &verified.manifest;
            match out {
                Output::Json => output::json(&serde_json::json!({
                    "valid": true, "name": m.name, "version": m.version,
                    "signers": verified.signers.iter().map(|k| &k.0).collect::<Vec<_>>(),
                })),
                Output::Table => {
                    println!(
                        "OK: {}@{} signed by {} trusted key(s); {} artifact(s) intact",
                        m.name,
                        m.version,
                        verified.signers.len(),
                        m.artifacts.len()
                    );
                    Ok(())
                }
            }
        }
        BundleCmd::Inspect { bundle } => inspect(&bundle, out),
        BundleCmd::Push { bundle } => {
            let client = Client::new(server)?;
            let bytes = std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let b: flotilla_api::v1::Bundle = client.post_bytes("/api/v1/bundles", bytes)?;
            match out {
                Output::Json => output::json(&b),
                Output::Table => {
                    println!("pushed {}@{} (bundle {}, {} bytes)", b.name, b.version, &b.id[..12], b.size);
                    Ok(())
                }
            }
        }
        BundleCmd::Ls => {
            let client = Client::new(server)?;
            let list: Vec<flotilla_api::v1::Bundle> = client.get("/api/v1/bundles")?;
            match out {
                Output::Json => output::json(&list),
                Output::Table => {
                    output::table(
                        &["NAME", "VERSION", "SIZE", "SIGNERS", "ID", "PUSHED"],
                        list.iter()
                            .map(|b| {
                                vec![
                                    b.name.clone(),
                                    b.version.to_string(),
                                    b.size.to_string(),
                                    b.signers.len().to_string(),
                                    b.id[..12].to_string(),
                                    b.pushed.clone(),
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

fn dims(shape: &[flotilla_bundle::Dim]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
}

fn inspect(path: &Path, out: Output) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (doc, data_offset) = read_envelope(&mut f)?;
    let m = decode_manifest(&doc.signed)?;
    let file_size = f.metadata()?.len();
    let view = serde_json::json!({
        "name": m.name,
        "version": m.version,
        "created": m.created,
        "expires": m.expires,
        "format": m.model.format.as_str(),
        "inputs": m.model.inputs.iter().map(|t| serde_json::json!({"name": t.name, "datatype": t.dtype.as_str(), "shape": dims(&t.shape)})).collect::<Vec<_>>(),
        "outputs": m.model.outputs.iter().map(|t| serde_json::json!({"name": t.name, "datatype": t.dtype.as_str(), "shape": dims(&t.shape)})).collect::<Vec<_>>(),
        "artifacts": m.artifacts.iter().map(|a| serde_json::json!({
            "name": a.name, "role": format!("{:?}", a.role).to_lowercase(), "media_type": a.media_type,
            "size": a.size, "stored_size": a.stored_size, "sha256": a.sha256,
            "encoding": match &a.encoding { flotilla_bundle::manifest::Encoding::Zstd => "zstd".to_string(), flotilla_bundle::manifest::Encoding::ZstdPatch { base_sha256 } => format!("zstd-patch from {base_sha256}") },
            "full_stored_size": a.full.as_ref().map(|f| f.stored_size),
        })).collect::<Vec<_>>(),
        // Bytes a device downloads: the head plus one stored form of each artifact.
        "download": {
            "file": file_size,
            "holding_bases": data_offset + m.artifacts.iter().map(|a| a.stored_size).sum::<u64>(),
            "without_bases": data_offset + m.artifacts.iter().map(|a| a.full.as_ref().map_or(a.stored_size, |f| f.stored_size)).sum::<u64>(),
        },
        "runtime": {"backends": m.runtime.backends, "threads": m.runtime.threads, "delegate": m.runtime.delegate, "accelerator_required": m.runtime.accelerator_required},
        "health": {"golden_tolerance": m.health.golden_tolerance, "latency_budget_us": m.health.latency_budget_us, "bake_secs": m.health.bake_secs, "max_error_rate": m.health.max_error_rate, "max_latency_p95_us": m.health.max_latency_p95_us, "golden": m.artifact(Role::Golden).is_some()},
        "signatures": doc.signatures.iter().map(|s| &s.keyid.0).collect::<Vec<_>>(),
        "data_offset": data_offset,
    });
    match out {
        Output::Json => output::json(&view),
        Output::Table => {
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(())
        }
    }
}
