//! f32 inference attention of one (sequence, head) on AVX-512, a few queries at a time:
//! `context = softmax(scale * q k^T + bias) v`, with each tile's scores kept in L1 from the
//! product that makes them, through the softmax, to the product that uses them.
//!
//! The softmax runs in base 2: the score product's last step turns each score into
//! `t = (scale q.k + bias) log2 e` and keeps each query's maximum, so the exponentials are
//! `e^(s - max) = 2^(t - max_t)` ([`exp2_nonpositive`]: 8 vector operations where the `e^x` it
//! replaces took 14) and no pass over the row looks for its maximum.
//!
//! Why: the general path computes a head's whole `seq x seq` score block with the `gemm`
//! crate (1 MiB at 512 tokens, which spills out of L2), exponentiates it row by row, then
//! multiplies it by `v`, repacking `k` and `v` inside each of the two products. Here `k` is
//! transposed and `v` packed once per (sequence, head), and each tile of [`TILE_QUERIES`]
//! queries runs both products from registers against a `TILE_QUERIES x seq` score block. The
//! gain is small (about 1% of a MiniLM pass at 8 x 512 and 32 x 128 on two Zen 4 cores: the
//! products run at ~84% of the FMA peak either way, and the softmax's `exp` costs the same).

use std::arch::x86_64::*;

use crate::panel_gemm::for_tile_rows;
use crate::vector_math::{exp2_nonpositive, store_and_sum};

/// Queries per tile: their accumulators for up to 64 keys (or a 64-wide head) fill 24 of the
/// 32 vector registers. Six, the panel product's tile, whose dispatch over 1..=6 rows
/// ([`for_tile_rows`]) serves here too.
const TILE_QUERIES: usize = 6;
const _: () = assert!(TILE_QUERIES == 6, "for_tile_rows dispatches 1..=6 rows");

/// Keys per vector register.
const LANES: usize = 16;

/// How many rows ahead [`pack`] asks for `v`: its rows lie a whole (QKV) row apart, a page or
/// more for long rows, where the hardware prefetchers do not follow.
const PACK_AHEAD: usize = 8;

/// `keys_t[i][j] = k[j][i]` and `values[j] = v[j]` for the `seq` keys of a head of `16 V`
/// dimensions: `k` transposed 16 keys x 16 dimensions at a time in registers
/// ([`transpose_16x16`]; element by element it cost twice as much), `v` rows copied as `V`
/// registers each (with no loop that the compiler could turn into a `memcpy` call per row).
///
/// # Safety
/// As [`attention_head`]; `keys_t` holds `16 V x padded`, `values` `seq x 16 V`.
#[target_feature(enable = "avx512f")]
unsafe fn pack<const V: usize>(
    k: *const f32,
    v: *const f32,
    ld: usize,
    seq: usize,
    padded: usize,
    keys_t: &mut [f32],
    values: &mut [f32],
) {
    let d = V * LANES;
    debug_assert!(keys_t.len() >= d * padded && values.len() >= seq * d);
    let whole = seq / LANES * LANES;
    for first in (0..whole).step_by(LANES) {
        // The next block's rows, each on its own line (or page).
        for j in first + LANES..whole.min(first + 2 * LANES) {
            for x in 0..V {
                _mm_prefetch::<_MM_HINT_T0>(k.add(j * ld + x * LANES).cast());
            }
        }
        for x in 0..V {
            let mut rows = [_mm512_setzero_ps(); LANES];
            for (j, row) in rows.iter_mut().enumerate() {
                *row = _mm512_loadu_ps(k.add((first + j) * ld + x * LANES));
            }
            for (i, column) in transpose_16x16(rows).into_iter().enumerate() {
                let at = (x * LANES + i) * padded + first;
                _mm512_storeu_ps(keys_t.as_mut_ptr().add(at), column);
            }
        }
    }
    for j in whole..seq {
        for i in 0..d {
            *keys_t.get_unchecked_mut(i * padded + j) = *k.add(j * ld + i);
        }
    }
    for j in 0..seq {
        let ahead = (j + PACK_AHEAD).min(seq - 1) * ld;
        for x in 0..V {
            _mm_prefetch::<_MM_HINT_T0>(v.add(ahead + x * LANES).cast());
        }
        let v_row = v.add(j * ld);
        for x in 0..V {
            _mm512_storeu_ps(
                values.as_mut_ptr().add(j * d + x * LANES),
                _mm512_loadu_ps(v_row.add(x * LANES)),
            );
        }
    }
}

/// The transpose of 16 rows of 16 floats: `out[i]` lane `j` is `rows[j]` lane `i`. Three
/// rounds of interleaving (floats, pairs of floats, 128-bit lanes twice): 64 shuffles.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_16x16(rows: [__m512; LANES]) -> [__m512; LANES] {
    // t[2k], t[2k + 1]: rows 2k and 2k + 1 interleaved; per 128-bit lane L, columns 4L, 4L + 1
    // and 4L + 2, 4L + 3 of the two rows.
    let mut t = [_mm512_setzero_ps(); LANES];
    for k in 0..LANES / 2 {
        t[2 * k] = _mm512_unpacklo_ps(rows[2 * k], rows[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(rows[2 * k], rows[2 * k + 1]);
    }
    // u[4g + c], lane L: column 4L + c of rows 4g..4g + 4.
    let mut u = [_mm512_setzero_ps(); LANES];
    let (pd, ps) = (_mm512_castps_pd, _mm512_castpd_ps);
    for g in 0..LANES / 4 {
        let (a, b, c, e) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        u[4 * g + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        u[4 * g + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(e)));
        u[4 * g + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(e)));
    }
    // Column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c]: first lanes 0-1
    // and 2-3 of each pair, then every other lane of those.
    let mut out = [_mm512_setzero_ps(); LANES];
    for c in 0..4 {
        let low01 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
        let low23 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
        let high01 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
        let high23 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(low01, high01);
        out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(low01, high01);
        out[8 + c] = _mm512_shuffle_f32x4::<0x88>(low23, high23);
        out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(low23, high23);
    }
    out
}

/// Per-thread buffers, kept across the (sequence, head) tasks a thread runs.
#[derive(Debug, Default)]
pub(crate) struct HeadScratch {
    /// `k^T`: `[head_dim][keys]`, keys zero-padded to a multiple of [`LANES`].
    keys_t: Vec<f32>,
    /// `v` rows packed contiguously: `[keys][head_dim]`.
    values: Vec<f32>,
    /// One tile's scores (base 2, see the module), then probabilities (unnormalised):
    /// `[TILE_QUERIES][padded keys]`.
    scores: Vec<f32>,
    /// The bias times `log2 e`, the padded keys' the most negative f32: `[padded keys]`.
    bias_log2: Vec<f32>,
}

/// Whether [`attention_head`] runs here for heads of `head_dim`: AVX-512F, AVX-512DQ (for
/// [`exp2_nonpositive`]) and FMA, and a head size of 16, 32, 48 or 64 (one to four registers;
/// BERT's are 32 and 64).
pub(crate) fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(LANES)
        && (1..=4).contains(&(head_dim / LANES))
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("fma")
}

/// `out[r, ..d] = softmax(scale * q_r k^T + bias) v` for every query `r < seq` of one
/// (sequence, head); `bias`, when given, is added to every query's scores (`seq` long: the
/// padding mask).
///
/// # Safety
/// [`supports`]`(d)` holds; row `r < seq` of `q`, `k` and `v` is the `d` floats at
/// `ptr + r * ld`; row `r` of `out` is the `d` floats at `out + r * out_stride`, which nothing
/// else reads or writes meanwhile and which do not overlap the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_head(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    ld: usize,
    seq: usize,
    d: usize,
    scale: f32,
    bias: Option<&[f32]>,
    out: *mut f32,
    out_stride: usize,
    scratch: &mut HeadScratch,
) {
    if seq == 0 {
        return;
    }
    if let Some(bias) = bias {
        assert_eq!(bias.len(), seq, "attention bias length");
    }
    let padded = seq.next_multiple_of(LANES);
    let HeadScratch {
        keys_t,
        values,
        scores,
        bias_log2,
    } = scratch;
    // An infinite bias (as `-inf` masks have) would make `t - max_t` NaN in a row with
    // nothing else: the most negative finite value instead, as transformers' masks use.
    let finite = |b: f32| if b == f32::NEG_INFINITY { f32::MIN } else { b };
    bias_log2.clear();
    bias_log2.extend((0..padded).map(|j| match bias {
        _ if j >= seq => f32::MIN,
        Some(bias) => finite(bias[j] * std::f32::consts::LOG2_E),
        None => 0.0,
    }));
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    keys_t.resize(d * padded, 0.0);
    values.resize(seq * d, 0.0);
    scores.resize(TILE_QUERIES * padded, 0.0);
    match d / LANES {
        1 => pack::<1>(k, v, ld, seq, padded, keys_t, values),
        2 => pack::<2>(k, v, ld, seq, padded, keys_t, values),
        3 => pack::<3>(k, v, ld, seq, padded, keys_t, values),
        _ => pack::<4>(k, v, ld, seq, padded, keys_t, values),
    }
    for i in 0..d {
        keys_t[i * padded + seq..(i + 1) * padded].fill(0.0);
    }
    let (mut sums, mut maxes) = ([0f32; TILE_QUERIES], [0f32; TILE_QUERIES]);
    for first in (0..seq).step_by(TILE_QUERIES) {
        let rows = TILE_QUERIES.min(seq - first);
        let q = q.add(first * ld);
        let tile = ScoreTile {
            keys_t,
            padded,
            d,
            scale_log2,
            bias_log2,
        };
        for_tile_rows!(rows, scores_tile(q, ld, &tile, scores, &mut maxes));
        for (r, sum) in sums.iter_mut().enumerate().take(rows) {
            *sum = exp2_row(&mut scores[r * padded..r * padded + seq], maxes[r]);
        }
        let out = out.add(first * out_stride);
        for_tile_rows!(
            rows,
            context_tile(scores, padded, seq, values, d, &sums, out, out_stride)
        );
    }
}

/// What a tile's scores are made from, the same for every tile of a head.
struct ScoreTile<'a> {
    /// `k^T`, `d x padded`.
    keys_t: &'a [f32],
    padded: usize,
    d: usize,
    /// `scale log2 e`.
    scale_log2: f32,
    /// `bias log2 e`, `padded` long (see [`HeadScratch`]).
    bias_log2: &'a [f32],
}

/// `scores[r, j] = t = (scale q_r . k_j + bias_j) log2 e` for the tile's `R` queries and every
/// (padded) key, 64 keys at a time (fewer at the end) with `R x 4` accumulators over the
/// head's `d` dimensions; `maxes[r]` the largest `t` of query `r` (the padded keys' are the
/// most negative f32).
///
/// # Safety
/// As [`attention_head`]: `q` covers `R` rows, `keys_t` is `d x padded`, `bias_log2` and
/// `scores` hold `padded` and `R x padded`.
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores_tile<const R: usize>(
    q: *const f32,
    ld: usize,
    tile: &ScoreTile,
    scores: &mut [f32],
    maxes: &mut [f32; TILE_QUERIES],
) {
    let mut max = [_mm512_set1_ps(f32::MIN); R];
    let mut first = 0;
    while first < tile.padded {
        match (tile.padded - first) / LANES {
            1 => scores_block::<R, 1>(q, ld, tile, first, scores, &mut max),
            2 => scores_block::<R, 2>(q, ld, tile, first, scores, &mut max),
            3 => scores_block::<R, 3>(q, ld, tile, first, scores, &mut max),
            _ => scores_block::<R, 4>(q, ld, tile, first, scores, &mut max),
        }
        first += 4 * LANES;
    }
    for (out, max) in maxes.iter_mut().zip(max) {
        *out = _mm512_reduce_max_ps(max);
    }
}

/// [`scores_tile`] for keys `first..first + 16 V`, folding their `t` into `max`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores_block<const R: usize, const V: usize>(
    q: *const f32,
    ld: usize,
    tile: &ScoreTile,
    first: usize,
    scores: &mut [f32],
    max: &mut [__m512; R],
) {
    let ScoreTile {
        keys_t, padded, d, ..
    } = *tile;
    debug_assert!(keys_t.len() >= d * padded && first + V * LANES <= padded);
    debug_assert!(tile.bias_log2.len() >= padded && scores.len() >= R * padded);
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let keys = keys_t.as_ptr().add(first);
    for i in 0..d {
        let row = keys.add(i * padded);
        let mut kv = [_mm512_setzero_ps(); V];
        for (x, kv) in kv.iter_mut().enumerate() {
            *kv = _mm512_loadu_ps(row.add(x * LANES));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let qv = _mm512_set1_ps(*q.add(r * ld + i));
            for (acc, &kv) in acc.iter_mut().zip(&kv) {
                *acc = _mm512_fmadd_ps(qv, kv, *acc);
            }
        }
    }
    let scale = _mm512_set1_ps(tile.scale_log2);
    for x in 0..V {
        let bias = _mm512_loadu_ps(tile.bias_log2.as_ptr().add(first + x * LANES));
        for (r, (acc, max)) in acc.iter().zip(max.iter_mut()).enumerate() {
            let t = _mm512_fmadd_ps(acc[x], scale, bias);
            // A NaN score need not survive here: it makes its own exponential NaN, and so
            // the row's sum and every output of the row.
            *max = _mm512_max_ps(*max, t);
            _mm512_storeu_ps(scores.as_mut_ptr().add(r * padded + first + x * LANES), t);
        }
    }
}

/// `row[j] = 2^(row[j] - max)` (`max` the row's largest, so every power is at most 1), and
/// their sum.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512DQ.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn exp2_row(row: &mut [f32], max: f32) -> f32 {
    let (len, p) = (row.len(), row.as_mut_ptr());
    let max = _mm512_set1_ps(max);
    store_and_sum(p, len, |at, lanes| {
        exp2_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, p.add(at)), max))
    })
}

/// `out_r = (sum_j p[r, j] v_j) / sums[r]` for the tile's `R` queries, `R x d/16`
/// accumulators over the `seq` keys.
///
/// # Safety
/// As [`attention_head`]: `scores` holds `R x padded`, `values` is `seq x d`, `out` covers `R`
/// rows of `d` at `out_stride`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,fma")]
unsafe fn context_tile<const R: usize>(
    scores: &[f32],
    padded: usize,
    seq: usize,
    values: &[f32],
    d: usize,
    sums: &[f32; TILE_QUERIES],
    out: *mut f32,
    out_stride: usize,
) {
    match d / LANES {
        1 => context_block::<R, 1>(scores, padded, seq, values, sums, out, out_stride),
        2 => context_block::<R, 2>(scores, padded, seq, values, sums, out, out_stride),
        3 => context_block::<R, 3>(scores, padded, seq, values, sums, out, out_stride),
        _ => context_block::<R, 4>(scores, padded, seq, values, sums, out, out_stride),
    }
}

/// [`context_tile`] for a head of `16 V` dimensions.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn context_block<const R: usize, const V: usize>(
    scores: &[f32],
    padded: usize,
    seq: usize,
    values: &[f32],
    sums: &[f32; TILE_QUERIES],
    out: *mut f32,
    out_stride: usize,
) {
    debug_assert!(scores.len() >= R * padded && values.len() >= seq * V * LANES);
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let p = scores.as_ptr();
    for j in 0..seq {
        let row = values.as_ptr().add(j * V * LANES);
        let mut vv = [_mm512_setzero_ps(); V];
        for (x, vv) in vv.iter_mut().enumerate() {
            *vv = _mm512_loadu_ps(row.add(x * LANES));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let pv = _mm512_set1_ps(*p.add(r * padded + j));
            for (acc, &vv) in acc.iter_mut().zip(&vv) {
                *acc = _mm512_fmadd_ps(pv, vv, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let norm = _mm512_set1_ps(1.0 / sums[r]);
        let at = out.add(r * out_stride);
        for (x, &sum) in acc.iter().enumerate() {
            _mm512_storeu_ps(at.add(x * LANES), _mm512_mul_ps(sum, norm));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention of one head in f64, straight from the formula.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        ld: usize,
        seq: usize,
        d: usize,
        scale: f64,
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; seq * d];
        for r in 0..seq {
            let scores: Vec<f64> = (0..seq)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|i| q[r * ld + i] as f64 * k[j * ld + i] as f64)
                        .sum();
                    dot * scale + bias.map_or(0.0, |b| b[j] as f64)
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for i in 0..d {
                out[r * d + i] = (0..seq)
                    .map(|j| exps[j] * v[j * ld + i] as f64)
                    .sum::<f64>()
                    / sum;
            }
        }
        out
    }

    #[test]
    fn transpose_16x16_transposes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [0f32; 256];
        // SAFETY: AVX-512F is present (checked above); 16 rows of 16 floats each way.
        unsafe {
            let rows = std::array::from_fn(|j| _mm512_loadu_ps(m.as_ptr().add(16 * j)));
            for (i, column) in transpose_16x16(rows).into_iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), column);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * i + j], m[16 * j + i], "[{i}][{j}]");
            }
        }
    }

    #[test]
    fn tiled_attention_matches_the_formula_for_every_tile_head_size_and_mask() {
        if !supports(32) {
            return; // no AVX-512 here: callers take the general path
        }
        let mut rng = crate::nn::SplitMix64(0x9E37_79B9_7F4A_7C15);
        let mut next = move || rng.next_f32() - 0.5;
        let mut scratch = HeadScratch::default();
        // Sequences across whole and partial query tiles and key blocks (of 16 and 64), every
        // head size, rows wider than the head (a packed QKV row), and a padding mask.
        for (seq, d, extra) in [
            (1, 32, 0),
            (7, 16, 5),
            (13, 32, 64),
            (64, 64, 0),
            (70, 48, 3),
            (129, 32, 352),
        ] {
            let ld = d + extra;
            let q: Vec<f32> = (0..seq * ld).map(|_| 4.0 * next()).collect();
            let k: Vec<f32> = (0..seq * ld).map(|_| 4.0 * next()).collect();
            let v: Vec<f32> = (0..seq * ld).map(|_| next()).collect();
            let masked: Vec<f32> = (0..seq)
                .map(|j| {
                    if j > 0 && j >= seq - seq / 3 {
                        -10000.0
                    } else {
                        0.0
                    }
                })
                .collect();
            // transformers' mask value on a third of the keys, and on every key (each query's
            // attention then spreads evenly, as transformers' does); -inf on every key as
            // the latter.
            let min_masked: Vec<f32> = masked
                .iter()
                .map(|&b| if b < 0.0 { f32::MIN } else { 0.0 })
                .collect();
            let all_min = vec![f32::MIN; seq];
            let all_neg_inf = vec![f32::NEG_INFINITY; seq];
            for (bias, as_bias) in [
                (None, None),
                (Some(&masked[..]), Some(&masked[..])),
                (Some(&min_masked[..]), Some(&min_masked[..])),
                (Some(&all_min[..]), Some(&all_min[..])),
                (Some(&all_neg_inf[..]), Some(&all_min[..])),
            ] {
                let scale = 1.0 / (d as f32).sqrt();
                let out_stride = d + 3;
                let mut out = vec![f32::NAN; seq * out_stride];
                // SAFETY: AVX-512 (checked); q, k, v cover seq rows of ld, out seq rows of
                // out_stride.
                unsafe {
                    attention_head(
                        q.as_ptr(),
                        k.as_ptr(),
                        v.as_ptr(),
                        ld,
                        seq,
                        d,
                        scale,
                        bias,
                        out.as_mut_ptr(),
                        out_stride,
                        &mut scratch,
                    );
                }
                let expected = reference(&q, &k, &v, ld, seq, d, scale as f64, as_bias);
                for r in 0..seq {
                    for i in 0..d {
                        let (got, want) = (out[r * out_stride + i] as f64, expected[r * d + i]);
                        assert!(
                            (got - want).abs() < 1e-5,
                            "seq {seq} d {d} last key's bias {:?} row {r} dim {i}: {got} vs {want}",
                            bias.map(|b| b[seq - 1])
                        );
                    }
                    // Past the head's columns nothing is written.
                    assert!(out[r * out_stride + d..(r + 1) * out_stride]
                        .iter()
                        .all(|x| x.is_nan()));
                }
            }
        }
    }
}
