//! The committed digits CNN, through the tract backend, against onnxruntime's reference outputs.

use flotilla_runtime::{Runtimes, Tensor, TensorData, check_inputs, tract_onnx::inspect_onnx};

fn models_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/models")
}

#[derive(serde::Deserialize)]
struct Sample {
    label: usize,
    input: Vec<f32>,
    reference_probabilities: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct TestSet {
    samples: Vec<Sample>,
}

#[test]
fn inspect_keeps_batch_symbolic() {
    let bytes = std::fs::read(models_dir().join("digits_cnn.onnx")).unwrap();
    let sig = inspect_onnx(&bytes).unwrap();
    assert_eq!(sig.inputs.len(), 1);
    assert_eq!(sig.inputs[0].name, "input");
    assert_eq!(format!("{:?}", sig.inputs[0].shape), r#"[Symbolic("N"), Fixed(1), Fixed(8), Fixed(8)]"#);
    assert_eq!(sig.outputs[0].name, "probabilities");
}

#[test]
fn batch_of_twenty_matches_reference() {
    let bytes = std::fs::read(models_dir().join("digits_cnn.onnx")).unwrap();
    let set: TestSet = serde_json::from_slice(&std::fs::read(models_dir().join("digits_test.json")).unwrap()).unwrap();
    let sig = inspect_onnx(&bytes).unwrap();
    let model = Runtimes::default().load(&bytes, &sig, &Default::default()).unwrap();
    assert_eq!(model.backend(), "tract-onnx");
    let n = set.samples.len();
    let flat: Vec<f32> = set.samples.iter().flat_map(|s| s.input.clone()).collect();
    let input = Tensor::new("input", vec![n, 1, 8, 8], TensorData::F32(flat)).unwrap();
    let out = flotilla_runtime::run(model.as_ref(), check_inputs(&sig.inputs, vec![input]).unwrap()).unwrap();
    assert_eq!(out[0].shape, vec![n, 10]);
    let TensorData::F32(probs) = &out[0].data else { panic!("f32 output") };
    for (i, s) in set.samples.iter().enumerate() {
        let row = &probs[i * 10..(i + 1) * 10];
        let class = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(class, s.label, "sample {i}");
        for (a, b) in row.iter().zip(&s.reference_probabilities) {
            assert!((a - b).abs() < 1e-4, "sample {i}: {a} vs {b}");
        }
    }
    // A single sample with a different batch size works on the same loaded model.
    let one = Tensor::new("input", vec![1, 1, 8, 8], TensorData::F32(set.samples[0].input.clone())).unwrap();
    let out = flotilla_runtime::run(model.as_ref(), check_inputs(&sig.inputs, vec![one]).unwrap()).unwrap();
    assert_eq!(out[0].shape, vec![1, 10]);
}

#[test]
fn bad_inputs_are_explained() {
    let bytes = std::fs::read(models_dir().join("digits_cnn.onnx")).unwrap();
    let sig = inspect_onnx(&bytes).unwrap();
    let wrong_shape = Tensor::new("input", vec![1, 64], TensorData::F32(vec![0.0; 64])).unwrap();
    let e = check_inputs(&sig.inputs, vec![wrong_shape]).unwrap_err().to_string();
    assert!(e.contains("shape [1, 64]") && e.contains("[N,1,8,8]"), "{e}");
    let wrong_name = Tensor::new("x", vec![1, 1, 8, 8], TensorData::F32(vec![0.0; 64])).unwrap();
    let e = check_inputs(&sig.inputs, vec![wrong_name]).unwrap_err().to_string();
    assert_eq!(e, "unknown input \"x\" (the model takes \"input\")", "the misspelt name is the one named");
    let wrong_type = Tensor::new("input", vec![1, 1, 8, 8], TensorData::I64(vec![0; 64])).unwrap();
    assert!(check_inputs(&sig.inputs, vec![wrong_type]).unwrap_err().to_string().contains("INT64"));
    assert!(Tensor::new("input", vec![2, 2], TensorData::F32(vec![0.0; 3])).is_err());
}

#[test]
fn int8_qdq_model_classifies_the_labelled_inputs() {
    // The quantizer's default puts Q/DQ around Softmax too; tract 0.23 then returns 1.0 for every
    // class without an error (examples/models/README.md). The fixture keeps Softmax in float, and
    // this test shows the int8 path itself gives the right classes.
    let bytes = std::fs::read(models_dir().join("digits_cnn_int8_qdq.onnx")).unwrap();
    let set: TestSet = serde_json::from_slice(&std::fs::read(models_dir().join("digits_test.json")).unwrap()).unwrap();
    let sig = inspect_onnx(&bytes).unwrap();
    let model = Runtimes::default().load(&bytes, &sig, &Default::default()).unwrap();
    let n = set.samples.len();
    let flat: Vec<f32> = set.samples.iter().flat_map(|s| s.input.clone()).collect();
    let input = Tensor::new("input", vec![n, 1, 8, 8], TensorData::F32(flat)).unwrap();
    let out = flotilla_runtime::run(model.as_ref(), check_inputs(&sig.inputs, vec![input]).unwrap()).unwrap();
    let TensorData::F32(probs) = &out[0].data else { panic!("f32 output") };
    let classes: Vec<usize> =
        probs.chunks(10).map(|row| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0).collect();
    assert_eq!(classes, set.samples.iter().map(|s| s.label).collect::<Vec<_>>());
}
