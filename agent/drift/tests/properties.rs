//! Merging the sketches of parts equals the sketch of the whole; streaming equals batch; the
//! quantile sketch keeps its stated error bound.

use flotilla_drift::{
    Collector, DriftConfig, Histogram, Kind, Live, Profile, QuantileSketch, Signal, Sketch, Source, TensorView, Values,
    compare,
};
use proptest::prelude::*;

fn values() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(
        prop_oneof![
            -1e6..1e6f64,
            -1.0..1.0f64,
            Just(0.0),
            (-300i32..300).prop_map(|e| 10f64.powi(e)),
            (-300i32..300).prop_map(|e| -(10f64.powi(e))),
        ],
        0..400,
    )
}

fn sketch_of(edges: &[f64], v: &[f64]) -> Sketch {
    let mut s = Sketch::baseline(Kind::Continuous, &[0.0], 4, 0).unwrap().empty_like();
    s.hist = Histogram::new(edges.to_vec()).unwrap();
    v.iter().for_each(|&x| s.add(x));
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn merged_parts_equal_the_whole(v in values(), cuts in prop::collection::vec(0usize..400, 0..6)) {
        let edges = [-100.0, -1.0, 0.0, 0.5, 3.0, 1e4];
        let whole = sketch_of(&edges, &v);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(v.len())).collect();
        cuts.sort();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(v.len());
        // Merge in reverse order, to show order does not matter.
        let mut merged = sketch_of(&edges, &[]);
        for w in bounds.windows(2).rev() {
            merged.merge(&sketch_of(&edges, &v[w[0]..w[1]])).unwrap();
        }
        // Histogram and quantile buckets exactly; count, min and max exactly; sums to rounding.
        prop_assert_eq!(&merged.hist, &whole.hist);
        prop_assert_eq!(&merged.quantiles, &whole.quantiles);
        prop_assert_eq!(merged.moments.count, whole.moments.count);
        prop_assert_eq!(merged.moments.min, whole.moments.min);
        prop_assert_eq!(merged.moments.max, whole.moments.max);
        let scale: f64 = v.iter().map(|x| x.abs()).sum::<f64>().max(1.0);
        prop_assert!((merged.moments.sum - whole.moments.sum).abs() <= 1e-9 * scale);
    }

    #[test]
    fn quantiles_stay_within_the_relative_bound(v in prop::collection::vec(prop_oneof![1e-6..1e6f64, -1e6..-1e-6f64], 1..500), q in 0.0..=1.0f64) {
        let mut s = QuantileSketch::new(0.01).unwrap();
        v.iter().for_each(|&x| s.add(x));
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        let truth = sorted[(q * (sorted.len() - 1) as f64).floor() as usize];
        let got = s.quantile(q).unwrap();
        prop_assert!((got - truth).abs() <= 0.01 * truth.abs() * (1.0 + 1e-9), "{} vs {}", got, truth);
    }

    #[test]
    fn streaming_equals_batch(rows in prop::collection::vec(prop::collection::vec(-5.0..5.0f32, 12), 1..40)) {
        // A model with input [N, 3, 4] and output [N, 4]: feeding the N samples one inference at a
        // time gives the same sketches as one batched inference.
        let profile = profile();
        let input: Vec<f32> = rows.concat();
        let output: Vec<f32> = rows.iter().flat_map(|r| r[..4].to_vec()).collect();
        let n = rows.len();
        let mut batch = Live::new(&profile);
        let shape_in = [n, 3, 4];
        let shape_out = [n, 4];
        let p_batch = batch.observe(
            &profile,
            &[TensorView { name: "x", shape: &shape_in, values: Values::F32(&input) }],
            &[TensorView { name: "y", shape: &shape_out, values: Values::F32(&output) }],
        );
        let mut stream = Live::new(&profile);
        let mut p_stream = Vec::new();
        for r in &rows {
            p_stream.extend(stream.observe(
                &profile,
                &[TensorView { name: "x", shape: &[1, 3, 4], values: Values::F32(r) }],
                &[TensorView { name: "y", shape: &[1, 4], values: Values::F32(&r[..4]) }],
            ));
        }
        prop_assert_eq!(p_batch, p_stream);
        for (a, b) in batch.sketches.iter().zip(&stream.sketches) {
            prop_assert_eq!(&a.hist, &b.hist);
            prop_assert_eq!(&a.quantiles, &b.quantiles);
            prop_assert_eq!(a.moments.count, b.moments.count);
        }
    }
}

fn profile() -> Profile {
    let signals = vec![
        (
            Signal {
                name: "x.c1".into(),
                source: Source::InputChannelMean { tensor: "x".into(), axis: 0, index: 1 },
                kind: Kind::Continuous,
            },
            0,
        ),
        (Signal { name: "x.mean".into(), source: Source::InputMean { tensor: "x".into() }, kind: Kind::Continuous }, 0),
        (Signal { name: "class".into(), source: Source::Class { output: "y".into() }, kind: Kind::Categorical }, 4),
        (
            Signal {
                name: "confidence".into(),
                source: Source::Confidence { output: "y".into(), softmax: true },
                kind: Kind::Continuous,
            },
            0,
        ),
    ];
    let mut c = Collector::new(signals);
    let data: Vec<f32> = (0..1200).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
    let out: Vec<f32> = data.chunks(12).flat_map(|r| r[..4].to_vec()).collect();
    c.observe(
        &[TensorView { name: "x", shape: &[100, 3, 4], values: Values::F32(&data) }],
        &[TensorView { name: "y", shape: &[100, 4], values: Values::F32(&out) }],
    );
    c.finish(DriftConfig::default(), 10).unwrap()
}

#[test]
fn a_window_like_the_baseline_scores_near_zero_and_a_shifted_one_does_not() {
    let profile = profile();
    let data: Vec<f32> = (0..1200).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
    let out: Vec<f32> = data.chunks(12).flat_map(|r| r[..4].to_vec()).collect();
    let mut same = Live::new(&profile);
    same.observe(
        &profile,
        &[TensorView { name: "x", shape: &[100, 3, 4], values: Values::F32(&data) }],
        &[TensorView { name: "y", shape: &[100, 4], values: Values::F32(&out) }],
    );
    for (sp, live) in profile.signals.iter().zip(&same.sketches) {
        let s = compare(&sp.baseline, live, 30);
        assert_eq!(s.count, 100);
        assert_eq!(s.psi, Some(0.0), "{}", sp.signal.name);
        assert_eq!(s.js, Some(0.0));
    }
    let shifted: Vec<f32> = data.iter().map(|x| x + 2.0).collect();
    let out: Vec<f32> = shifted.chunks(12).flat_map(|r| r[..4].to_vec()).collect();
    let mut moved = Live::new(&profile);
    moved.observe(
        &profile,
        &[TensorView { name: "x", shape: &[100, 3, 4], values: Values::F32(&shifted) }],
        &[TensorView { name: "y", shape: &[100, 4], values: Values::F32(&out) }],
    );
    let mean = compare(&profile.signals[1].baseline, &moved.sketches[1], 30);
    assert!(mean.psi.unwrap() > 0.2, "{mean:?}");
    assert!((mean.wasserstein.unwrap() - 2.0).abs() < 0.1, "{mean:?}");
    assert!(!mean.exceeded(&profile.config.thresholds).is_empty());
    // Below the minimum count nothing is scored.
    assert_eq!(compare(&profile.signals[1].baseline, &moved.sketches[1], 1000).psi, None);
    // Feedback feeds accuracy signals only.
    let mut live = Live::new(&profile);
    live.feedback(&profile, true);
    assert!(live.sketches.iter().all(|s| s.count() == 0));
}

#[test]
fn profiles_survive_json_and_bad_ones_are_refused() {
    let p = profile();
    let text = serde_json::to_string(&p).unwrap();
    assert!(text.contains(r#""from":"input-channel-mean""#), "{text}");
    let mut back: Profile = serde_json::from_str(&text).unwrap();
    assert_eq!(back, p);
    back.validate().unwrap();
    back.config.consecutive = 0;
    assert!(back.validate().is_err());
    let mut bad = p.clone();
    bad.signals[0].baseline.hist.counts.pop();
    assert!(bad.validate().is_err());
}
