//! The GPU attention kernel's logic, checked without a GPU: its CUDA source, built under the
//! CPU emulation of `tests/cuda_emulation/` (f32 elements, plain loops for the tensor-core
//! tile products), against the plain path written with candle's ops in f64. Covers one and
//! several key tiles, partial query and key tiles, both head sizes, padded keys and no bias,
//! the packed (padding-free) layout of sequences of mixed lengths, and the QKV projection's
//! bias added by the kernel.

use bert::bert_embeddings::nn::SplitMix64;
use bert::{Device, Tensor};
use bert_tests::cuda_emulation::{flash_attention, flash_attention_packed};
use bert_tests::max_abs_diff;

/// softmax(q k^T / sqrt(d) + bias) v per head, in f64, from the packed `[batch, seq, 3 * hidden]`,
/// as `[batch, seq, hidden]`.
fn plain_attention(
    qkv: &[f32],
    bias: Option<&[f32]>,
    (batch, seq, heads, head_dim): (usize, usize, usize, usize),
) -> Tensor {
    let hidden = heads * head_dim;
    let packed = Tensor::from_slice(qkv, (batch, seq, 3 * hidden), &Device::Cpu)
        .and_then(|t| t.to_dtype(bert::DType::F64))
        .unwrap();
    let split = |part: usize| {
        packed
            .narrow(2, part * hidden, hidden)
            .and_then(|t| t.reshape((batch, seq, heads, head_dim)))
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.contiguous())
            .unwrap()
    };
    let (q, k, v) = (split(0), split(1), split(2));
    let scores = q
        .matmul(&k.t().unwrap())
        .and_then(|s| s * (1.0 / (head_dim as f64).sqrt()))
        .unwrap();
    let scores = match bias {
        Some(bias) => {
            let bias = Tensor::from_slice(bias, (batch, 1, 1, seq), &Device::Cpu)
                .and_then(|b| b.to_dtype(bert::DType::F64))
                .unwrap();
            scores.broadcast_add(&bias).unwrap()
        }
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
    probs
        .matmul(&v)
        .and_then(|c| c.transpose(1, 2))
        .and_then(|c| c.reshape((batch, seq, hidden)))
        .unwrap()
}

#[test]
fn the_kernel_source_matches_the_plain_path() {
    let mut rng = SplitMix64(7);
    // (batch, seq, heads, head_dim), and the real lengths of the sequences when there is a bias.
    type Case<'a> = ((usize, usize, usize, usize), Option<&'a [usize]>);
    let cases: [Case; 6] = [
        ((2, 1, 2, 32), Some(&[1, 1])),
        ((2, 17, 3, 32), Some(&[17, 9])),
        ((1, 64, 2, 64), None),
        ((2, 100, 2, 64), Some(&[100, 40])),
        ((3, 33, 1, 32), Some(&[33, 1, 32])),
        ((1, 130, 2, 32), Some(&[130])),
    ];
    for (shape, lengths) in cases {
        let (batch, seq, heads, head_dim) = shape;
        let hidden = heads * head_dim;
        // Spread wide enough that the softmax is peaked and the online maximum moves.
        let qkv: Vec<f32> = (0..batch * seq * 3 * hidden)
            .map(|_| (2.0 * rng.next_normal()) as f32)
            .collect();
        let bias: Option<Vec<f32>> = lengths.map(|lengths| {
            lengths
                .iter()
                .flat_map(|&length| {
                    (0..seq).map(move |key| if key < length { 0.0 } else { f32::MIN })
                })
                .collect()
        });
        let expected = plain_attention(&qkv, bias.as_deref(), shape);
        let ours = flash_attention(&qkv, None, bias.as_deref(), shape).expect("head size built");
        let ours = Tensor::from_vec(ours, (batch, seq, hidden), &Device::Cpu).unwrap();
        let worst = max_abs_diff(&ours, &expected);
        assert!(worst <= 2e-5, "{shape:?} {lengths:?}: max |diff| {worst:e}");

        // The projection's bias added by the kernel as it loads: the product without it, then
        // the same context.
        let projection_bias = random_projection_bias(&mut rng, hidden);
        let unbiased = without_projection_bias(&qkv, &projection_bias);
        let ours = flash_attention(&unbiased, Some(&projection_bias), bias.as_deref(), shape)
            .expect("head size built");
        let ours = Tensor::from_vec(ours, (batch, seq, hidden), &Device::Cpu).unwrap();
        let worst = max_abs_diff(&ours, &expected);
        assert!(
            worst <= 2e-5,
            "{shape:?} {lengths:?}, projection bias in the kernel: max |diff| {worst:e}"
        );
    }
}

/// A bias of the QKV projection, `3 * hidden` values.
fn random_projection_bias(rng: &mut SplitMix64, hidden: usize) -> Vec<f32> {
    (0..3 * hidden).map(|_| rng.next_normal() as f32).collect()
}

/// `qkv` rows minus the projection's bias: the product the kernel is given when it adds the
/// bias itself.
fn without_projection_bias(qkv: &[f32], projection_bias: &[f32]) -> Vec<f32> {
    qkv.iter()
        .zip(projection_bias.iter().cycle())
        .map(|(x, b)| x - b)
        .collect()
}

/// Packed rows: every sequence, wherever it starts, gets the context it gets alone (the plain
/// path over its own rows, no bias); blocks past a short sequence's end write nothing of
/// another's (the output starts as NaN, so an unwritten row fails too).
#[test]
fn packed_sequences_match_each_sequence_alone() {
    let mut rng = SplitMix64(11);
    // Lengths around the 64-query block and 32-key tile edges, a 1-token sequence, one of
    // three query blocks among short ones.
    let cases: [(&[usize], usize, usize); 3] = [
        (&[17, 1, 64, 65, 3], 2, 32),
        (&[130, 5, 33], 2, 64),
        (&[1], 1, 32),
    ];
    for (lengths, heads, head_dim) in cases {
        let hidden = heads * head_dim;
        let rows: usize = lengths.iter().sum();
        let qkv: Vec<f32> = (0..rows * 3 * hidden)
            .map(|_| (2.0 * rng.next_normal()) as f32)
            .collect();
        let projection_bias = random_projection_bias(&mut rng, hidden);
        let unbiased = without_projection_bias(&qkv, &projection_bias);
        let runs = [
            (
                "no projection bias",
                flash_attention_packed(&qkv, None, lengths, heads, head_dim),
            ),
            (
                "projection bias in the kernel",
                flash_attention_packed(&unbiased, Some(&projection_bias), lengths, heads, head_dim),
            ),
        ];
        for (run, ours) in runs {
            let ours = ours.expect("head size built");
            let mut start = 0;
            for &length in lengths {
                let own = &qkv[start * 3 * hidden..(start + length) * 3 * hidden];
                let expected = plain_attention(own, None, (1, length, heads, head_dim));
                let got = Tensor::from_slice(
                    &ours[start * hidden..(start + length) * hidden],
                    (1, length, hidden),
                    &Device::Cpu,
                )
                .unwrap();
                let worst = max_abs_diff(&got, &expected);
                assert!(
                    worst <= 2e-5,
                    "{lengths:?}, {run}, the one at row {start}: max |diff| {worst:e}"
                );
                start += length;
            }
        }
    }
}

#[test]
fn other_head_sizes_are_refused() {
    assert!(flash_attention(&[0.0; 3 * 48], None, None, (1, 1, 1, 48)).is_none());
}
