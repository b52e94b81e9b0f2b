//! The trainer really improves the model on drifted data: the digits CNN loses about a quarter
//! of its accuracy when the camera brightens (x' = clip(0.6x + 0.35, 0, 1), the drift
//! make_digits.py uses); retraining only its last layer on labelled drifted samples (plus the
//! clean ones, so it does not forget them) wins most of it back on held-out images it never saw.

use flotilla_trainer::{Dataset, TrainOptions, accuracy, read_samples, retrain};

const MODEL: &[u8] = include_bytes!("../../models/digits_cnn.onnx");
const IMAGES: &[u8] = include_bytes!("../../models/digits_baseline.npy");
const LABELS: &[u8] = include_bytes!("../../models/digits_baseline_labels.npy");

fn drift(x: f32) -> f32 {
    (0.6 * x + 0.35).clamp(0.0, 1.0)
}

fn dataset(range: std::ops::Range<usize>, drifted: bool) -> Dataset {
    let images = flotilla_builder::npy::parse(IMAGES).unwrap().data;
    let labels = flotilla_builder::npy::parse(LABELS).unwrap().data;
    let values: Vec<f32> = images[range.start * 64..range.end * 64]
        .iter()
        .map(|&x| if drifted { drift(x as f32) } else { x as f32 })
        .collect();
    Dataset {
        input: "input".into(),
        sample_shape: vec![1, 8, 8],
        values,
        labels: labels[range].iter().map(|&l| l as u32).collect(),
    }
}

#[test]
fn retraining_the_last_layer_wins_back_drifted_accuracy() {
    let mut train = dataset(0..300, true);
    train.extend(dataset(0..300, false)).unwrap();
    let (held_drifted, held_clean) = (dataset(300..450, true), dataset(300..450, false));
    let before = (accuracy(MODEL, &held_drifted).unwrap(), accuracy(MODEL, &held_clean).unwrap());
    let new = retrain(MODEL, &train, &TrainOptions::default()).unwrap();
    let after = (accuracy(&new, &held_drifted).unwrap(), accuracy(&new, &held_clean).unwrap());
    eprintln!("held-out accuracy drifted {:.3} -> {:.3}, clean {:.3} -> {:.3}", before.0, after.0, before.1, after.1);
    assert!(before.0 < 0.85, "the drift hurts the original model: {before:?}");
    assert!(after.0 >= 0.9 && after.0 >= before.0 + 0.1, "retraining wins it back: {before:?} -> {after:?}");
    assert!(after.1 >= before.1 - 0.05, "and keeps the clean accuracy: {before:?} -> {after:?}");
    // Same inputs and outputs: a drop-in replacement the builder reads as before.
    let sig =
        |m: &[u8]| flotilla_builder::signature(&flotilla_builder::BuildOptions::new("d", 1, m.to_vec(), 0)).unwrap();
    assert_eq!(sig(&new), sig(MODEL));
}

#[test]
fn samples_without_labels_are_skipped_and_bad_ones_refused() {
    let json = br#"[
        {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.5]}], "labels": [1]},
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": []}]}
    ]"#;
    assert!(read_samples(json).is_err(), "2 samples, 1 label");
    let data: Vec<f32> = vec![0.25; 64];
    let ok = serde_json::json!([
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}], "label": 3},
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}]},
    ]);
    let set = read_samples(ok.to_string().as_bytes()).unwrap();
    assert_eq!((set.len(), set.labels.clone(), set.sample_shape.clone()), (1, vec![3], vec![1, 8, 8]));
    assert!(retrain(MODEL, &Dataset::default(), &TrainOptions::default()).is_err());
}
