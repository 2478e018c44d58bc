//! The GPU epilogue kernels' logic, checked without a GPU: `crates/embeddings/src/cuda/
//! epilogues.cu` built under the CPU emulation of `tests/cuda_emulation/` (f32 elements)
//! against plain loops in f64. Bias + GELU over partial last blocks and several widths;
//! bias + residual + LayerNorm for every register build, rows that fill a lane's registers
//! exactly or partly, blocks with idle warps, every combination of bias and residual, and rows
//! far from zero mean (where `E[x^2] - mean^2` would cancel); LayerNorm's backward against
//! candle's autograd through the CPU LayerNorm in f64; the attention softmax and its backward
//! against plain loops and that autograd.

use bert::bert_embeddings::nn::SplitMix64;
use bert::{Device, Tensor};
use bert_tests::cuda_emulation::{
    attention_softmax, attention_softmax_backward, bias_gelu, dropout_mask, layer_norm_backward,
    residual_layer_norm,
};
use bert_tests::max_abs_diff;

fn normal(rng: &mut SplitMix64, n: usize, scale: f64, offset: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (offset + scale * rng.next_normal()) as f32)
        .collect()
}

/// [`max_abs_diff`] of the kernel's f32 output and the f64 expectation (a non-finite value
/// counts as infinitely far).
fn max_diff(ours: &[f32], expected: &[f64]) -> f64 {
    let ours = Tensor::from_slice(ours, ours.len(), &Device::Cpu).unwrap();
    let expected = Tensor::from_slice(expected, expected.len(), &Device::Cpu).unwrap();
    max_abs_diff(&ours, &expected)
}

#[test]
fn bias_gelu_matches_the_plain_loop() {
    let mut rng = SplitMix64(11);
    // (rows, cols): one partial block, several blocks with a partial last one, wide rows.
    for (rows, cols) in [(1, 8), (3, 384), (5, 1536), (2, 3072)] {
        let x = normal(&mut rng, rows * cols, 3.0, 0.0);
        let bias = normal(&mut rng, cols, 1.0, 0.0);
        let ours = bias_gelu(&x, &bias).expect("a width the kernel takes");
        let expected: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let v = x as f64 + bias[i % cols] as f64;
                0.5 * v * (1.0 + candle_core::cpu::erf::erf_f64(v / std::f64::consts::SQRT_2))
            })
            .collect();
        let diff = max_diff(&ours, &expected);
        assert!(diff <= 2e-6, "{rows} x {cols}: max |diff| {diff:e}");
    }
    assert!(
        bias_gelu(&[0.0; 12], &[0.0; 6]).is_none(),
        "rows that are not whole vectors are refused"
    );
}

fn plain_layer_norm(
    x: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    (gamma, beta): (&[f32], &[f32]),
    eps: f64,
) -> Vec<f64> {
    let hidden = gamma.len();
    let mut out = Vec::with_capacity(x.len());
    for (r, row) in x.chunks(hidden).enumerate() {
        let v: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(c, &x)| {
                x as f64
                    + bias.map_or(0.0, |b| b[c] as f64)
                    + residual.map_or(0.0, |res| res[r * hidden + c] as f64)
            })
            .collect();
        let mean = v.iter().sum::<f64>() / hidden as f64;
        let variance = v.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / hidden as f64;
        let inverse_std = 1.0 / (variance + eps).sqrt();
        out.extend(
            v.iter()
                .enumerate()
                .map(|(c, v)| (v - mean) * inverse_std * gamma[c] as f64 + beta[c] as f64),
        );
    }
    out
}

#[test]
fn residual_layer_norm_matches_the_plain_loop() {
    let mut rng = SplitMix64(12);
    // (rows, hidden, registers a lane): exact fits, partial lanes, a build larger than needed,
    // and row counts that leave warps of the last block idle.
    let cases = [
        (5, 384, 12),
        (7, 384, 16),
        (1, 100, 4),
        (2, 32, 4),
        (9, 768, 24),
        (3, 1024, 32),
        (4, 200, 8),
    ];
    for (rows, hidden, per_lane) in cases {
        // BERT's residual streams sit far from zero mean: offset 300, spread 1.
        let x = normal(&mut rng, rows * hidden, 1.0, 300.0);
        let bias = normal(&mut rng, hidden, 0.5, 0.0);
        let residual = normal(&mut rng, rows * hidden, 1.0, -20.0);
        let gamma = normal(&mut rng, hidden, 0.3, 1.0);
        let beta = normal(&mut rng, hidden, 0.3, 0.0);
        for (with_bias, with_residual) in
            [(true, true), (false, true), (true, false), (false, false)]
        {
            let bias = with_bias.then_some(bias.as_slice());
            let residual = with_residual.then_some(residual.as_slice());
            let ours = residual_layer_norm(&x, bias, residual, (&gamma, &beta), 1e-12, per_lane)
                .expect("a build that fits the row");
            let expected = plain_layer_norm(&x, bias, residual, (&gamma, &beta), 1e-12);
            let diff = max_diff(&ours, &expected);
            // The f32 sum x + bias + residual rounds by ~1.5e-5 near 280 and the spread is
            // about 1, so that is the kernel's floor; a one-pass variance misses by ~1e-3.
            assert!(
                diff <= 2e-4,
                "{rows} x {hidden} ({per_lane} a lane, bias {with_bias}, residual \
                 {with_residual}): max |diff| {diff:e}"
            );
        }
    }
    let ones = vec![1.0f32; 200];
    assert!(
        residual_layer_norm(&ones, None, None, (&ones, &ones), 1e-12, 4).is_none(),
        "a row wider than 32 x registers is refused"
    );
    assert!(
        residual_layer_norm(&ones, None, None, (&ones, &ones), 1e-12, 5).is_none(),
        "a register count that is not built is refused"
    );
}

/// The GPU's dropout mask is the CPU's: element i is kept exactly when draw i + 1 of the seeded
/// SplitMix64 stream is at least p, so a run drops the same elements on either device. Two
/// launches from the moved-on state continue the stream without a gap.
/// The input's and gamma's gradients of `sum(LayerNorm(x) * dy)` by autograd through the CPU's
/// LayerNorm in f64, flat.
fn autograd_layer_norm(
    x: &[f32],
    dy: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    use bert::bert_embeddings::nn::LayerNorm;
    use candle_core::{Module, Var};
    let hidden = gamma.len();
    let rows = x.len() / hidden;
    let f64_tensor = |v: &[f32], shape: &[usize]| {
        Tensor::from_slice(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(bert::DType::F64))
            .unwrap()
    };
    let x = Var::from_tensor(&f64_tensor(x, &[rows, hidden])).unwrap();
    let gamma = Var::from_tensor(&f64_tensor(gamma, &[hidden])).unwrap();
    let beta = Var::from_tensor(&f64_tensor(beta, &[hidden])).unwrap();
    let norm = LayerNorm::new(gamma.as_tensor().clone(), beta.as_tensor().clone(), eps);
    let y = norm.forward(x.as_tensor()).unwrap();
    let loss = (y * f64_tensor(dy, &[rows, hidden]))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let flat = |v: &Var| {
        grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    (flat(&x), flat(&gamma))
}

#[test]
fn layer_norm_backward_matches_autograd() {
    let mut rng = SplitMix64(14);
    let eps = 1e-12;
    // (rows, hidden, registers a lane): exact fits, partial lanes, idle warps in the last block.
    for (rows, hidden, per_lane) in [(5, 384, 12), (6, 768, 24), (3, 100, 4), (9, 1024, 32)] {
        // Rows far from zero mean, as BERT's residual streams.
        let x = normal(&mut rng, rows * hidden, 2.0, 5.0);
        let dy = normal(&mut rng, rows * hidden, 1.0, 0.0);
        let gamma = normal(&mut rng, hidden, 0.3, 1.0);
        let beta = normal(&mut rng, hidden, 0.1, 0.0);
        let (dx, dy_xhat) =
            layer_norm_backward(&x, &dy, &gamma, eps as f32, per_lane).expect("a build");
        let (expected_dx, expected_dgamma) = autograd_layer_norm(&x, &dy, (&gamma, &beta), eps);
        let diff = max_diff(&dx, &expected_dx);
        assert!(diff <= 2e-5, "{rows} x {hidden}: dx max |diff| {diff:e}");
        // gamma's gradient is dy * xhat summed over rows (beta's, dy summed, has no kernel).
        let column_sum = |v: &[f32]| -> Vec<f32> {
            (0..hidden)
                .map(|c| (0..rows).map(|r| v[r * hidden + c]).sum())
                .collect()
        };
        let diff = max_diff(&column_sum(&dy_xhat), &expected_dgamma);
        assert!(
            diff <= 1e-4,
            "{rows} x {hidden}: dgamma max |diff| {diff:e}"
        );
    }
    assert!(
        layer_norm_backward(&[0.0; 200], &[0.0; 200], &[1.0; 200], 1e-12, 4).is_none(),
        "a build too small for the row is refused"
    );
}

#[test]
fn attention_softmax_and_its_backward_match_the_cpu() {
    use bert::bert_embeddings::nn::attention_probabilities;
    use candle_core::Var;
    let mut rng = SplitMix64(15);
    let (heads, queries) = (3, 5);
    // (batch, keys, registers a lane), each sequence's real keys: a 1-key row, partial lanes,
    // the widest build, a sequence padded to one key.
    let cases: [(usize, usize, &[usize]); 4] = [
        (1, 1, &[1]),
        (2, 50, &[50, 17]),
        (2, 512, &[512, 300]),
        (3, 96, &[96, 1, 40]),
    ];
    for (batch, keys, lengths) in cases {
        let per_lane = [1, 2, 4, 8, 16]
            .into_iter()
            .find(|&p| 32 * p >= keys)
            .unwrap();
        let scale = 0.125f32;
        let x = normal(&mut rng, batch * heads * queries * keys, 4.0, 0.0);
        let dy = normal(&mut rng, x.len(), 1.0, 0.0);
        let bias: Vec<f32> = lengths
            .iter()
            .flat_map(|&n| (0..keys).map(move |k| if k < n { 0.0 } else { f32::MIN }))
            .collect();
        let y = attention_softmax(&x, &bias, keys, scale, per_lane).expect("a build");
        let dx = attention_softmax_backward(&y, &dy, keys, scale, per_lane).expect("a build");

        // The CPU's attention probabilities in f64, and their gradient by autograd.
        let f64_tensor = |v: &[f32], shape: &[usize]| {
            Tensor::from_slice(v, shape, &Device::Cpu)
                .and_then(|t| t.to_dtype(bert::DType::F64))
                .unwrap()
        };
        let scores = Var::from_tensor(&f64_tensor(&x, &[batch, heads, queries, keys])).unwrap();
        let mask = f64_tensor(&bias, &[batch, 1, 1, keys]);
        let probs = attention_probabilities(scores.as_tensor(), Some(&mask), scale as f64).unwrap();
        let grads = (&probs * f64_tensor(&dy, &[batch, heads, queries, keys]))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let diff = max_diff(&y, &flat(&probs));
        assert!(
            diff <= 1e-6,
            "{batch} x {keys}: probabilities max |diff| {diff:e}"
        );
        let diff = max_diff(&dx, &flat(grads.get(scores.as_tensor()).unwrap()));
        assert!(
            diff <= 1e-6,
            "{batch} x {keys}: gradient max |diff| {diff:e}"
        );
    }
    assert!(
        attention_softmax(&[0.0; 40], &[0.0; 40], 40, 1.0, 1).is_none(),
        "a build too small for the row is refused"
    );
}

#[test]
fn dropout_mask_draws_the_cpu_stream() {
    let (p, scale) = (0.1f32, 1.0f32 / 0.9);
    let mut stream = SplitMix64(0x5EED);
    let expected: Vec<f32> = (0..1500)
        .map(|_| if stream.next_f32() >= p { scale } else { 0.0 })
        .collect();
    let first = dropout_mask(1000, 0x5EED, p, scale);
    // The state after 1000 draws: each draw adds the golden gamma once.
    let moved = 0x5EEDu64.wrapping_add(1000u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let second = dropout_mask(500, moved, p, scale);
    let got: Vec<f32> = first.into_iter().chain(second).collect();
    assert_eq!(got, expected);
    let dropped = got.iter().filter(|&&m| m == 0.0).count();
    assert!(
        (100..200).contains(&dropped),
        "{dropped} of 1500 dropped at p = 0.1"
    );
}
