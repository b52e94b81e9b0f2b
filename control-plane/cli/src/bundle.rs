//! `flotilla bundle ...`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use flotilla_builder::baseline::{self, DriftOptions, Reference};
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
    /// symbolic unless pinned, and unnamed ones (`?`, -1) are each free on their own. Golden
    /// outputs come from tract, or from the TFLite library (--tflite-lib) for TFLite models.
    /// Without --golden, every device self-tests the model on smoke inputs made from its
    /// signature; the build tries that here first and refuses a model that fails it.
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
        /// Largest allowed difference between golden and device outputs: absolute for values
        /// up to 1 in magnitude, relative above (a box at pixel 300 may differ by 0.03).
        #[arg(long, default_value_t = 1e-4)]
        golden_tolerance: f64,
        /// Median self-test latency budget on the device, e.g. 50ms: judged on the golden cases,
        /// or without --golden on smoke inputs made from the signature (free dimensions 1 at axis
        /// 0, else 32).
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
        /// The TensorFlow Lite C library to run TFLite models with here (golden outputs, drift
        /// baseline, smoke trial), as devices that have it do; tract-tflite runs them too, and
        /// the build warns where the two disagree.
        #[arg(long, value_name = "LIB.so", env = "FLOTILLA_TFLITE_LIB")]
        tflite_lib: Option<PathBuf>,
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
        #[command(flatten)]
        drift: DriftArgs,
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

/// Drift monitoring: the baseline the devices compare their live data with.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Drift")]
pub struct DriftArgs {
    /// Reference data (the training or validation set) to compute the drift baseline from:
    /// `.npy` (single-input models; the first axis indexes samples), CSV (one `[N, F]` input; a
    /// `label` column holds true classes) or JSON v2 infer requests. The model runs over all of
    /// it; the profile of each signal is stored in the bundle.
    #[arg(long, value_name = "DATA")]
    pub baseline: Option<PathBuf>,
    /// True classes of the baseline samples (`.npy` or one per line): the accuracy baseline.
    #[arg(long, value_name = "FILE", requires = "baseline")]
    pub baseline_labels: Option<PathBuf>,
    /// Report window: a time (`30s`, `5m`; aligned across devices) or a number of inferences
    /// (`200`: each device reports every 200; the control plane merges reports of a cohort that
    /// arrive together, and a device's next report starts the cohort's next window).
    #[arg(long, value_name = "WINDOW", default_value = "60s", requires = "baseline")]
    pub drift_window: String,
    /// Alert threshold, METRIC=VALUE with METRIC one of psi, js, ks, wasserstein (repeatable;
    /// default psi=0.2). A window drifts when any metric exceeds its threshold.
    #[arg(long, value_name = "METRIC=VALUE", requires = "baseline")]
    pub drift_threshold: Vec<String>,
    /// Windows in a row over a threshold before the control plane raises an alert.
    #[arg(long, value_name = "K", default_value_t = 2, requires = "baseline")]
    pub drift_consecutive: u32,
    /// Fewest values in a (merged) window for its metrics to be computed (with 10 bins, an
    /// unshifted window of n values has a PSI of about 9/n from noise alone).
    #[arg(long, value_name = "N", default_value_t = 100, requires = "baseline")]
    pub drift_min_count: u64,
    /// How to turn an input into signals: NAME=mean, NAME=channel-mean[:AXIS], NAME=features,
    /// NAME=off (repeatable). Default: per-channel means for images, one signal per feature
    /// for up to 32 tabular features, else the mean.
    #[arg(long, value_name = "NAME=HOW", requires = "baseline")]
    pub drift_input: Vec<String>,
    /// Also watch each dimension of this output (an embedding; repeatable).
    #[arg(long, value_name = "OUTPUT", requires = "baseline")]
    pub drift_embedding: Vec<String>,
    /// Histogram bins per continuous signal (equal-mass on the baseline).
    #[arg(long, value_name = "N", default_value_t = 10, requires = "baseline")]
    pub drift_bins: usize,
    /// Let devices keep a reservoir sample of up to N inputs per model version (with their
    /// predictions and feedback labels) that the control plane may upload for retraining.
    #[arg(long, value_name = "N", requires = "baseline")]
    pub drift_sample: Option<u32>,
}

impl DriftArgs {
    fn options(
        &self,
        sig: &flotilla_bundle::manifest::ModelSignature,
    ) -> anyhow::Result<Option<(Reference, DriftOptions)>> {
        let Some(path) = &self.baseline else { return Ok(None) };
        let mut reference = baseline::read(path, sig)?;
        if let Some(l) = &self.baseline_labels {
            anyhow::ensure!(
                reference.labels.is_none(),
                "the baseline CSV has a label column already; drop --baseline-labels"
            );
            reference.labels = Some(baseline::read_labels(l)?);
        }
        let mut config = flotilla_drift::DriftConfig {
            window: flotilla_drift::Window::parse(&self.drift_window)
                .map_err(|e| anyhow::anyhow!("--drift-window: {e}"))?,
            consecutive: self.drift_consecutive.max(1),
            min_count: self.drift_min_count,
            sample: self.drift_sample.map(|size| flotilla_drift::SamplePolicy { size }),
            ..Default::default()
        };
        if !self.drift_threshold.is_empty() {
            config.thresholds.clear();
        }
        for t in &self.drift_threshold {
            let (m, v) = t
                .split_once('=')
                .with_context(|| format!("--drift-threshold {t:?}: expected METRIC=VALUE, e.g. psi=0.2"))?;
            let metric = flotilla_drift::Metric::parse(m)
                .with_context(|| format!("--drift-threshold {t:?}: metrics are psi, js, ks, wasserstein"))?;
            let v: f64 =
                v.trim().parse().with_context(|| format!("--drift-threshold {t:?}: the value is not a number"))?;
            anyhow::ensure!(v.is_finite() && v >= 0.0, "--drift-threshold {t:?}: expected a value ≥ 0");
            config.thresholds.insert(metric, v);
        }
        let inputs = self.drift_input.iter().map(|s| baseline::Reduction::parse(s)).collect::<Result<Vec<_>, _>>()?;
        anyhow::ensure!(
            (1..=flotilla_drift::MAX_BINS).contains(&self.drift_bins),
            "--drift-bins must be 1 to {}",
            flotilla_drift::MAX_BINS
        );
        Ok(Some((
            reference,
            DriftOptions {
                config,
                inputs,
                embeddings: self.drift_embedding.clone(),
                bins: self.drift_bins,
                signals: None,
            },
        )))
    }
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
            tflite_lib,
            expires,
            delta_from,
            delta_only,
            drift,
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
            opts.tflite_lib = tflite_lib;
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
            opts.drift = drift.options(&sig)?;
            let spin = crate::progress::spinner(&format!("building {name}@{version} (golden outputs, drift baseline)"));
            let built = build(&opts);
            spin.finish_and_clear();
            let built = built?;
            for w in &built.warnings {
                eprintln!("warning: {w}");
            }
            std::fs::write(&path, &built.bytes).with_context(|| format!("writing {}", path.display()))?;
            let m = &built.manifest;
            match out {
                Output::Json | Output::Yaml => output::json(&serde_json::json!({
                    "bundle": path, "name": m.name, "version": m.version, "size": built.bytes.len(),
                    "golden_cases": opts.golden.len() + opts.golden_reference.len(), "warnings": built.warnings, "signed": false, "delta": opts.delta_base.is_some(),
                    "drift_signals": built.profile.as_ref().map(|p| p.signals.iter().map(|s| s.signal.name.clone()).collect::<Vec<_>>()),
                    "self_test": {
                        "kind": built.self_test.kind.as_str(), "inputs": built.self_test.inputs,
                        "backend_here": built.self_test.here.as_ref().map(|h| &h.0),
                        "median_us_here": built.self_test.here.as_ref().map(|h| h.1),
                        "latency_budget_us": m.health.latency_budget_us,
                    },
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
                    let t = &built.self_test;
                    let here = match &t.here {
                        Some((backend, us)) => format!("; here {} median on {backend}", crate::output::micros(*us)),
                        None => String::new(),
                    };
                    let budget = m
                        .health
                        .latency_budget_us
                        .map_or(String::new(), |b| format!(", latency budget {}", crate::output::micros(b)));
                    println!("  self-test on every device: {} on {}{budget}{here}", t.kind.as_str(), t.inputs);
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
                    if let Some(p) = &built.profile {
                        let names: Vec<&str> = p.signals.iter().map(|s| s.signal.name.as_str()).collect();
                        let thresholds: Vec<String> =
                            p.config.thresholds.iter().map(|(m, v)| format!("{}>{v}", m.as_str())).collect();
                        println!(
                            "  drift baseline: {} signals ({}), window {}, alert after {} windows with {}",
                            names.len(),
                            names.join(", "),
                            p.config.window,
                            p.config.consecutive,
                            thresholds.join(" or ")
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
                Output::Json | Output::Yaml => {
                    output::json(&serde_json::json!({"bundle": dest, "key_id": key.key_id().0}))
                }
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
                Output::Json | Output::Yaml => output::json(&serde_json::json!({
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
            let file = std::fs::File::open(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let len = file.metadata()?.len();
            let bar = crate::progress::bytes(len, "uploading");
            let body = crate::progress::Counting { inner: file, bar: bar.clone() };
            let b: flotilla_api::v1::Bundle = client.post_reader("/api/v1/bundles", body, len)?;
            bar.finish_and_clear();
            match out {
                Output::Json | Output::Yaml => output::json(&b),
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
                Output::Json | Output::Yaml => output::json(&list),
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
    let golden_cases = match m.artifact(Role::Golden) {
        Some(a) => {
            let bytes = flotilla_bundle::format::extract_artifact_to_vec(&mut f, data_offset, a, None, 1 << 30)?;
            Some(flotilla_bundle::golden::GoldenSet::decode(&bytes)?.cases.len())
        }
        None => None,
    };
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
        // What every device runs the model on before it may serve.
        "self_test": match golden_cases {
            Some(n) => serde_json::json!({"kind": "golden", "cases": n}),
            None => serde_json::json!({"kind": "smoke", "inputs": flotilla_runtime::smoke::describe(&m.model), "warmup_runs": m.health.warmup_runs, "timed_runs": flotilla_runtime::selftest::TIMED_RUNS}),
        },
        "signatures": doc.signatures.iter().map(|s| &s.keyid.0).collect::<Vec<_>>(),
        "data_offset": data_offset,
    });
    match out {
        Output::Json | Output::Yaml => output::json(&view),
        Output::Table => {
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(())
        }
    }
}
