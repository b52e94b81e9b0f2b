//! Latency of real models on every backend this machine has: tract, TensorFlow Lite's built-in
//! kernels, and TensorFlow Lite with XNNPACK. One thread, median of many runs, inputs from the
//! reference cases. Prints a table; asserts nothing.
//!   cargo bench -p flotilla-runtime --bench latency
//! The TFLite library and models come from `assets/fetch.sh` (run first if missing).

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_bundle::manifest::{DType, ModelFormat, ModelSignature, RuntimeSettings};
use flotilla_runtime::{Runtimes, Tensor, TensorData};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn measure(
    runtimes: &Runtimes,
    bytes: &[u8],
    sig: &ModelSignature,
    settings: &RuntimeSettings,
    inputs: &[Tensor],
) -> Result<Duration, String> {
    let model = runtimes.load(bytes, sig, settings).map_err(|e| e.to_string())?;
    let once = || flotilla_runtime::run(model.as_ref(), inputs.to_vec()).map_err(|e| e.to_string());
    // Enough runs for about half a second, at least 50.
    let t0 = Instant::now();
    once()?;
    let runs = ((0.5 / t0.elapsed().as_secs_f64().max(1e-6)) as usize).clamp(50, 5000);
    for _ in 0..runs / 10 {
        once()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        once()?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

fn main() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let assets = crate_dir.join("../../target/test-assets/tflite");
    if !assets.join("models/reference.json").exists() {
        let ok =
            std::process::Command::new("bash").arg(crate_dir.join("assets/fetch.sh")).arg(&assets).status().unwrap();
        assert!(ok.success(), "assets/fetch.sh failed");
    }
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(assets.join("models/reference.json")).unwrap()).unwrap();
    let runtimes = Runtimes::with_tflite(Some(&assets.join("lib/libtensorflowlite_c.so"))).unwrap();
    let one_thread = |backend: &str, delegate: Option<&str>| RuntimeSettings {
        backends: vec![backend.into()],
        threads: Some(1),
        delegate: delegate.map(String::from),
        accelerator_required: delegate.is_some(),
    };
    let columns: [(&str, RuntimeSettings); 3] = [
        ("tract", one_thread("tract-tflite", None)),
        ("tflite", one_thread("tflite", None)),
        ("tflite+xnnpack", one_thread("tflite", Some("xnnpack"))),
    ];
    println!("median latency, one thread (TFLite models from openWakeWord / micro-wakeword)");
    println!("{:<38} {:>14} {:>14} {:>16}", "model", columns[0].0, columns[1].0, columns[2].0);
    for m in reference["models"].as_array().unwrap() {
        let file = m["file"].as_str().unwrap();
        let bytes = std::fs::read(assets.join("models").join(file)).unwrap();
        let sig: ModelSignature = serde_json::from_value(m["signature"].clone()).unwrap();
        let inputs: Vec<Tensor> = m["cases"][0]["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let dtype: DType = serde_json::from_value(t["dtype"].clone()).unwrap();
                let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
                let data: Vec<f64> = serde_json::from_value(t["data"].clone()).unwrap();
                Tensor::new(t["name"].as_str().unwrap(), shape, TensorData::from_f64(dtype, &data).unwrap()).unwrap()
            })
            .collect();
        let cells: Vec<String> = columns
            .iter()
            .map(|(_, settings)| match measure(&runtimes, &bytes, &sig, settings, &inputs) {
                Ok(d) => format!("{:.1} µs", d.as_secs_f64() * 1e6),
                Err(_) => "unsupported".into(),
            })
            .collect();
        println!("{file:<38} {:>14} {:>14} {:>16}", cells[0], cells[1], cells[2]);
    }
    // The committed ONNX fixtures on tract-onnx, for scale.
    for (name, bytes) in [
        ("digits_cnn.onnx", &include_bytes!("../../../examples/models/digits_cnn.onnx")[..]),
        ("digits_cnn_wide.onnx", &include_bytes!("../../../examples/models/digits_cnn_wide.onnx")[..]),
    ] {
        let sig = flotilla_runtime::tract_onnx::inspect_onnx(bytes).unwrap();
        let sig = ModelSignature { format: ModelFormat::Onnx, ..sig };
        let input = Tensor::new("input", vec![1, 1, 8, 8], TensorData::F32(vec![0.5; 64])).unwrap();
        let d = measure(&runtimes, bytes, &sig, &one_thread("tract-onnx", None), &[input]).unwrap();
        println!("{name:<38} {:>14} {:>14} {:>16}", format!("{:.1} µs", d.as_secs_f64() * 1e6), "-", "-");
    }
}
