//! The parity fixtures run on a chosen device, so a build can be checked where it runs (a GPU
//! machine, a user's laptop) without the test suite or Python. `bert selftest` is its command.
//!
//! The reference is what HF transformers computed for all-MiniLM-L6-v2 on five single texts and
//! four sentence pairs, each set padded into one batch (`tests/fixtures/minilm/outputs.safetensors`,
//! written by `tests/scripts/generate_fixtures.py`; the CLI compiles it in, a program can load
//! it with `candle_core::safetensors::load`). Any other BERT with a pooler can be checked the
//! same way against transformers' outputs for it on the fixture's inputs (`bert selftest --model
//! DIR --reference FILE`; `tests/scripts/gpu/random_checkpoints.py` writes such pairs). Checks,
//! per batch:
//! - f32: `last_hidden_state` on real tokens and `pooler_output` within [`F32_LIMIT`] of
//!   transformers (TF32 off on CUDA, so f32 matmuls stay f32);
//! - f16 and bf16: every output finite, and cosine >= [`HALF_COSINE`] to our f32 result;
//! - each text alone equals its row of the padded batch (f32), within [`F32_LIMIT`].
//!
//! Where the build has the GPU kernels (the `cuda` feature), `device` is CUDA and they are on
//! ([`bert_embeddings::nn::set_gpu_fused_kernels`]), also: per dtype, the model with the
//! kernels against the model on the plain path (f32 within [`F32_LIMIT`], f16/bf16 cosine >=
//! [`HALF_COSINE`]); the epilogue kernels alone (bias + GELU, bias + residual + LayerNorm) on
//! random inputs against the CPU in f32 on the same values; training's f32 LayerNorm and
//! attention softmax (each a forward kernel and a backward kernel): their outputs' gradients
//! against the CPU's, within [`F32_LIMIT`]; and, where the build has it, the
//! fused attention kernel alone (both head sizes it is built for: a padded sequence, and
//! packed rows of four sequences after a QKV projection whose bias the kernel adds) against
//! the CPU's exact f32 attention on the same inputs. Kernel-alone checks: f32 within
//! [`F32_LIMIT`], f16/bf16 cosine >= [`KERNEL_COSINE`].
//!
//! Padded positions are left out of value comparisons for the reason `tests/tests/parity_minilm.rs`
//! gives (transformers' own f32 states there are ill-conditioned), but must still be finite.
//!
//! ```no_run
//! use std::collections::HashMap;
//! use bert::{selftest, Device, ModelSource};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let files = bert::DEFAULT_MODEL.parse::<ModelSource>()?.fetch()?;
//! let expected: HashMap<_, _> = candle_core::safetensors::load(
//!     "tests/fixtures/minilm/outputs.safetensors",
//!     &Device::Cpu,
//! )?;
//! let checks = selftest::run(&files, &Device::Cpu, &expected)?;
//! assert!(checks.iter().all(|check| check.passed()));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::compare::{cosine, larger, lengths, max_abs_diff, real_tokens};
use crate::{load, BertInputs, BertModel, Error, ForwardOptions, ModelFiles, Result};

/// Largest element-wise difference allowed in f32, against transformers and batched vs alone.
pub const F32_LIMIT: f64 = 1e-4;
/// Smallest cosine allowed between a half-precision result and the f32 one.
pub const HALF_COSINE: f64 = 0.999;

/// Smallest cosine allowed between a GPU kernel and the exact f32 computation on the same
/// half-precision inputs: only roundings to f16/bf16 (the attention's probabilities, a
/// product's output) separate them, a relative 2^-9 at most, while an indexing slip costs far
/// more. In f32 the kernels are held to [`F32_LIMIT`].
pub const KERNEL_COSINE: f64 = 0.9999;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was compared, e.g. `pair f16 pooler_output`.
    pub name: String,
    /// The measured value: a max |difference| or a cosine (NaN when something was not finite).
    pub value: f64,
    /// The limit the value is held to.
    pub limit: Limit,
}

/// How a check's value is judged.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// A max |difference| at most this.
    AtMost(f64),
    /// A cosine at least this, every value finite.
    AtLeast(f64),
}

impl Check {
    /// Whether the value is within its limit (a NaN never is).
    pub fn passed(&self) -> bool {
        match self.limit {
            Limit::AtMost(limit) => self.value <= limit,
            Limit::AtLeast(limit) => self.value >= limit,
        }
    }

    /// One line of the report.
    pub fn line(&self) -> String {
        let (measured, limit) = match self.limit {
            Limit::AtMost(limit) => (
                format!("max |diff| {:.2e}", self.value),
                format!("<= {limit:.0e}"),
            ),
            Limit::AtLeast(limit) => (format!("cosine {:.6}", self.value), format!(">= {limit}")),
        };
        let verdict = if self.passed() { "ok" } else { "FAILED" };
        format!("{:<46} {measured:>19}  {limit:<9} {verdict}", self.name)
    }
}

/// Runs every check of all-MiniLM-L6-v2 (`files`) on `device` against `expected` (the fixture's
/// tensors, or a changed copy of them).
pub fn run(
    files: &ModelFiles,
    device: &Device,
    expected: &HashMap<String, Tensor>,
) -> Result<Vec<Check>> {
    // The fixture is f32 arithmetic; TF32 would round matmul inputs to 10 mantissa bits.
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let model = |dtype| -> Result<BertModel> { Ok(load::<BertModel>(files, dtype, device)?.model) };
    let f32_model = model(DType::F32)?;
    let half_models = [
        (DType::F16, model(DType::F16)?),
        (DType::BF16, model(DType::BF16)?),
    ];
    let tensor = |name: &str| -> Result<Tensor> {
        let t = expected
            .get(name)
            .ok_or_else(|| Error::SelfTest(format!("the reference has no tensor {name}")))?;
        Ok(t.to_device(device)?)
    };

    // The GPU kernels are checked where they run: a CUDA build, on CUDA, switched on.
    let check_kernels = device.is_cuda()
        && bert_embeddings::nn::gpu_fused_epilogues_built()
        && bert_embeddings::nn::gpu_fused_kernels();
    let mut checks = Vec::new();
    for batch in ["single", "pair"] {
        let ids = tensor(&format!("{batch}.input_ids"))?;
        let mask = tensor(&format!("{batch}.attention_mask"))?;
        let types = tensor(&format!("{batch}.token_type_ids"))?;
        let inputs = BertInputs::new(&ids)
            .with_attention_mask(&mask)
            .with_token_type_ids(&types);
        let (hidden, pooled) = encode(&f32_model, &inputs)?;
        let want_hidden = tensor(&format!("{batch}.last_hidden_state"))?;
        let want_pooled = tensor(&format!("{batch}.pooler_output"))?;
        checks.push(Check {
            name: format!("{batch} f32 last_hidden_state vs transformers"),
            value: max_abs_diff(
                &real_tokens(&hidden, &mask)?,
                &real_tokens(&want_hidden, &mask)?,
            )?,
            limit: Limit::AtMost(F32_LIMIT),
        });
        checks.push(Check {
            name: format!("{batch} f32 pooler_output vs transformers"),
            value: max_abs_diff(&pooled, &want_pooled)?,
            limit: Limit::AtMost(F32_LIMIT),
        });
        if check_kernels {
            let (plain_hidden, _) = on_plain_path(|| encode(&f32_model, &inputs))?;
            checks.push(Check {
                name: format!("{batch} f32 fused kernels vs plain path"),
                value: max_abs_diff(
                    &real_tokens(&hidden, &mask)?,
                    &real_tokens(&plain_hidden, &mask)?,
                )?,
                limit: Limit::AtMost(F32_LIMIT),
            });
        }

        // Each half model's padded pass, kept for the padding-free checks below.
        let mut half_padded = Vec::with_capacity(half_models.len());
        for (dtype, half_model) in &half_models {
            let (half_hidden, half_pooled) = encode(half_model, &inputs)?;
            half_padded.push(half_hidden.clone());
            let name = format!("{dtype:?}").to_lowercase();
            // Masking keeps a non-finite padded value visible (as NaN), so the cosine, which
            // is NaN on any non-finite value, also checks that padding stayed finite.
            checks.push(Check {
                name: format!("{batch} {name} last_hidden_state vs f32"),
                value: cosine(
                    &real_tokens(&half_hidden, &mask)?,
                    &real_tokens(&hidden, &mask)?,
                )?,
                limit: Limit::AtLeast(HALF_COSINE),
            });
            checks.push(Check {
                name: format!("{batch} {name} pooler_output vs f32"),
                value: cosine(&half_pooled, &pooled)?,
                limit: Limit::AtLeast(HALF_COSINE),
            });
            if check_kernels {
                // The same model on the plain path, against the fused pass above.
                let (plain_hidden, _) = on_plain_path(|| encode(half_model, &inputs))?;
                checks.push(Check {
                    name: format!("{batch} {name} fused kernels vs plain path"),
                    value: cosine(
                        &real_tokens(&half_hidden, &mask)?,
                        &real_tokens(&plain_hidden, &mask)?,
                    )?,
                    limit: Limit::AtLeast(HALF_COSINE),
                });
            }
        }

        // Padding-free (packed rows), against the padded pass: the same real tokens, zeros at
        // the padding (compared with the padded pass's states zeroed there).
        let (packed_hidden, _) = encode_with(&f32_model, &inputs, true)?;
        checks.push(Check {
            name: format!("{batch} f32 padding-free vs padded"),
            value: max_abs_diff(&packed_hidden, &real_tokens(&hidden, &mask)?)?,
            limit: Limit::AtMost(F32_LIMIT),
        });
        for ((dtype, half_model), padded) in half_models.iter().zip(&half_padded) {
            let (half_packed, _) = encode_with(half_model, &inputs, true)?;
            checks.push(Check {
                name: format!("{batch} {dtype:?} padding-free vs padded").to_lowercase(),
                value: cosine(&half_packed, &real_tokens(padded, &mask)?)?,
                limit: Limit::AtLeast(HALF_COSINE),
            });
        }

        // Each row alone, cut to its real tokens, against its row of the padded batch.
        let mut worst = 0f64;
        for (row, length) in lengths(&mask)?.into_iter().enumerate() {
            let cut = |t: &Tensor| t.narrow(0, row, 1)?.narrow(1, 0, length);
            let (ids, mask, types) = (cut(&ids)?, cut(&mask)?, cut(&types)?);
            let alone = BertInputs::new(&ids)
                .with_attention_mask(&mask)
                .with_token_type_ids(&types);
            let (alone_hidden, alone_pooled) = encode(&f32_model, &alone)?;
            let batched = hidden.narrow(0, row, 1)?.narrow(1, 0, length)?;
            worst = larger(worst, max_abs_diff(&alone_hidden, &batched)?);
            worst = larger(
                worst,
                max_abs_diff(&alone_pooled, &pooled.narrow(0, row, 1)?)?,
            );
        }
        checks.push(Check {
            name: format!("{batch} f32 each text alone vs batched"),
            value: worst,
            limit: Limit::AtMost(F32_LIMIT),
        });
    }
    if check_kernels {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            checks.extend(epilogue_kernel_checks(device, dtype)?);
        }
        checks.push(layer_norm_gradient_check(device)?);
        checks.push(softmax_gradient_check(device)?);
        if bert_embeddings::nn::gpu_fused_attention_built() {
            for dtype in [DType::F16, DType::BF16] {
                for head_dim in [32, 64] {
                    checks.push(attention_kernel_check(device, dtype, head_dim)?);
                    checks.push(packed_attention_kernel_check(device, dtype, head_dim)?);
                }
            }
        }
    }
    Ok(checks)
}

/// `f()` with the GPU kernels switched off (the plain path), switched on again after.
fn on_plain_path<R>(f: impl FnOnce() -> R) -> R {
    bert_embeddings::nn::set_gpu_fused_kernels(false);
    let result = f();
    bert_embeddings::nn::set_gpu_fused_kernels(true);
    result
}

/// A kernel's result against the exact one: max |diff| within [`F32_LIMIT`] in f32, cosine
/// >= [`KERNEL_COSINE`] in f16/bf16.
fn kernel_check(name: String, dtype: DType, kernel: &Tensor, exact: &Tensor) -> Result<Check> {
    let kernel = kernel.to_dtype(DType::F32)?;
    Ok(if dtype == DType::F32 {
        Check {
            name,
            value: max_abs_diff(&kernel, exact)?,
            limit: Limit::AtMost(F32_LIMIT),
        }
    } else {
        Check {
            name,
            value: cosine(&kernel, exact)?,
            limit: Limit::AtLeast(KERNEL_COSINE),
        }
    })
}

/// The GPU epilogue kernels through the layers that run them (bias + GELU after a `384 ->
/// 1536` projection, bias + residual + LayerNorm after a `1536 -> 384` one, the LayerNorm
/// alone) on random `[2, 100, ..]` inputs in `dtype`, against the CPU in f32 on the same
/// values.
fn epilogue_kernel_checks(device: &Device, dtype: DType) -> Result<Vec<Check>> {
    use bert_embeddings::nn::{LayerNorm, Linear, SplitMix64};
    let (hidden, intermediate) = (384, 1536);
    let mut rng = SplitMix64(dtype.size_in_bytes() as u64);
    let mut random = |shape: &[usize], scale: f64, offset: f64| {
        normal_tensor(&mut rng, shape, (scale, offset), dtype)
    };
    let x = random(&[2, 100, hidden], 1.0, 0.0)?;
    let inner = random(&[2, 100, intermediate], 1.0, 0.0)?;
    // Residual streams sit off zero mean.
    let residual = random(&[2, 100, hidden], 1.0, 5.0)?;
    let up = (
        random(&[intermediate, hidden], (hidden as f64).powf(-0.5), 0.0)?,
        random(&[intermediate], 0.5, 0.0)?,
    );
    let down = (
        random(
            &[hidden, intermediate],
            (intermediate as f64).powf(-0.5),
            0.0,
        )?,
        random(&[hidden], 0.5, 0.0)?,
    );
    let (gamma, beta) = (random(&[hidden], 0.2, 1.0)?, random(&[hidden], 0.2, 0.0)?);
    // The three results on `place`: the inputs moved there as they are, or (`exact`) as f32.
    let run = |place: &Device, exact: bool| -> Result<[Tensor; 3]> {
        let put = |t: &Tensor| -> Result<Tensor> {
            Ok(if exact {
                t.to_dtype(DType::F32)?
            } else {
                t.to_device(place)?
            })
        };
        let up = Linear::new(put(&up.0)?, Some(put(&up.1)?));
        let down = Linear::new(put(&down.0)?, Some(put(&down.1)?));
        let norm = LayerNorm::new(put(&gamma)?, put(&beta)?, 1e-12);
        let residual = put(&residual)?;
        Ok([
            up.forward_activation(&put(&x)?, bert_embeddings::HiddenAct::Gelu)?,
            down.forward_residual_norm(&put(&inner)?, &residual, &norm)?,
            candle_core::Module::forward(&norm, &residual)?,
        ])
    };
    let kernel = run(device, false)?;
    let exact = run(&Device::Cpu, true)?;
    let name = format!("{dtype:?}").to_lowercase();
    let names = ["bias + GELU", "bias + residual + LayerNorm", "LayerNorm"];
    names
        .into_iter()
        .zip(kernel.iter().zip(&exact))
        .map(|(what, (kernel, exact))| {
            kernel_check(
                format!("{name} {what} kernel vs exact"),
                dtype,
                kernel,
                exact,
            )
        })
        .collect()
}

/// `shape` values drawn by `rng` from a normal of standard deviation `scale` around `offset`,
/// rounded to f32, as a tensor on the CPU in `dtype`.
fn normal_tensor(
    rng: &mut bert_embeddings::nn::SplitMix64,
    shape: &[usize],
    (scale, offset): (f64, f64),
    dtype: DType,
) -> Result<Tensor> {
    let values: Vec<f32> = (0..shape.iter().product())
        .map(|_| (offset + scale * rng.next_normal()) as f32)
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// The largest max |difference| of the pairs of `a` and `b` (same shapes, on the CPU).
fn largest_difference(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let mut largest = 0f64;
    for (a, b) in a.iter().zip(b) {
        largest = largest.max(max_abs_diff(a, b)?);
    }
    Ok(largest)
}

/// Training's LayerNorm on the GPU (its forward kernel and its own backward kernel) against
/// the CPU's: the gradients of `sum(LayerNorm(x) * dy)` for x, gamma and beta, on random
/// `[2, 100, 768]` f32 inputs off zero mean; the largest |difference| of any of them.
fn layer_norm_gradient_check(device: &Device) -> Result<Check> {
    use bert_embeddings::nn::{LayerNorm, SplitMix64};
    use candle_core::{Module, Var};
    let hidden = 768;
    let mut rng = SplitMix64(768);
    let mut random = |shape: &[usize], scale: f64, offset: f64| {
        normal_tensor(&mut rng, shape, (scale, offset), DType::F32)
    };
    let x = random(&[2, 100, hidden], 2.0, 5.0)?;
    let dy = random(&[2, 100, hidden], 1.0, 0.0)?;
    let (gamma, beta) = (random(&[hidden], 0.2, 1.0)?, random(&[hidden], 0.2, 0.0)?);
    let gradients = |place: &Device| -> Result<Vec<Tensor>> {
        let var = |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_device(place)?)?) };
        let (x, gamma, beta) = (var(&x)?, var(&gamma)?, var(&beta)?);
        let norm = LayerNorm::new(gamma.as_tensor().clone(), beta.as_tensor().clone(), 1e-12);
        let y = norm.forward(x.as_tensor())?;
        let grads = (y * dy.to_device(place)?)?.sum_all()?.backward()?;
        [x, gamma, beta]
            .iter()
            .map(|v| {
                let g = grads.get(v.as_tensor()).ok_or_else(|| {
                    Error::SelfTest("LayerNorm recorded no gradient for an input".into())
                })?;
                Ok(g.flatten_all()?.to_device(&Device::Cpu)?)
            })
            .collect()
    };
    Ok(Check {
        name: "f32 LayerNorm gradients (training) vs CPU".into(),
        value: largest_difference(&gradients(device)?, &gradients(&Device::Cpu)?)?,
        limit: Limit::AtMost(F32_LIMIT),
    })
}

/// Attention's f32 softmax on the GPU (its kernel and its backward kernel, as training runs
/// them) against the CPU's: the probabilities and the scores' gradient of
/// `sum(softmax(scale * scores + mask) * dy)` on random `[2, 12, 100, 100]` scores, the second
/// sequence padded after 40 keys; the largest |difference| of either.
fn softmax_gradient_check(device: &Device) -> Result<Check> {
    use bert_embeddings::nn::{attention_probabilities, SplitMix64};
    use candle_core::Var;
    let shape = [2, 12, 100, 100];
    let mut rng = SplitMix64(100);
    let scores = normal_tensor(&mut rng, &shape, (4.0, 0.0), DType::F32)?;
    let dy = normal_tensor(&mut rng, &shape, (1.0, 0.0), DType::F32)?;
    let mask: Vec<f32> = (0..2 * 100)
        .map(|i| if i >= 100 + 40 { f32::MIN } else { 0.0 })
        .collect();
    let run = |place: &Device| -> Result<[Tensor; 2]> {
        let scores = Var::from_tensor(&scores.to_device(place)?)?;
        let mask = Tensor::from_slice(&mask, (2, 1, 1, 100), place)?;
        let probs = attention_probabilities(scores.as_tensor(), Some(&mask), 0.125)?;
        let grads = (&probs * dy.to_device(place)?)?.sum_all()?.backward()?;
        let grad = grads
            .get(scores.as_tensor())
            .ok_or_else(|| Error::SelfTest("the attention softmax recorded no gradient".into()))?;
        Ok([
            probs.to_device(&Device::Cpu)?,
            grad.to_device(&Device::Cpu)?,
        ])
    };
    Ok(Check {
        name: "f32 attention softmax + gradient vs CPU".into(),
        value: largest_difference(&run(device)?, &run(&Device::Cpu)?)?,
        limit: Limit::AtMost(F32_LIMIT),
    })
}

/// The GPU attention kernel on random `[2, 100, 3 * 12 * head_dim]` inputs in `dtype`, the
/// second sequence padded after 40 tokens, against the CPU's f32 attention on the same values.
fn attention_kernel_check(device: &Device, dtype: DType, head_dim: usize) -> Result<Check> {
    use bert_embeddings::nn::{fused_attention_packed, SplitMix64};
    let (batch, seq, heads) = (2, 100, 12);
    let mut rng = SplitMix64(head_dim as u64);
    let qkv = normal_tensor(
        &mut rng,
        &[batch, seq, 3 * heads * head_dim],
        (2.0, 0.0),
        dtype,
    )?;
    let mask: Vec<u32> = (0..batch * seq)
        .map(|i| u32::from(i < seq || i % seq < 40))
        .collect();
    let mask = Tensor::from_vec(mask, (batch, seq), &Device::Cpu)?;
    let bias = bert_encoder::padding_bias(&mask, batch, seq)?;
    let attend = |qkv: &Tensor, bias: &Tensor| -> Result<Tensor> {
        let (context, _) = fused_attention_packed(qkv, heads, Some(bias), false)?
            .ok_or_else(|| Error::SelfTest(format!("no fused attention for {:?}", qkv.device())))?;
        Ok(context)
    };
    let exact = attend(&qkv.to_dtype(DType::F32)?, &bias)?;
    let kernel = attend(&qkv.to_device(device)?, &bias.to_device(device)?)?;
    let name = format!("{dtype:?} attention kernel d{head_dim} vs exact").to_lowercase();
    kernel_check(name, dtype, &kernel, &exact)
}

/// The GPU attention kernel over packed rows, from the layer input through a fused QKV
/// projection whose bias the kernel adds as it loads (`fused_qkv_attention`): sequences of
/// 100, 40, 1 and 65 tokens (one, two and a partial block of 64 queries) on random inputs in
/// `dtype`, against the CPU's f32 projection and attention over the same rows.
fn packed_attention_kernel_check(device: &Device, dtype: DType, head_dim: usize) -> Result<Check> {
    use bert_embeddings::nn::{
        fused_qkv_attention, Linear, PackedSequences, QkvAttention, SplitMix64,
    };
    let (lengths, heads) = ([100, 40, 1, 65], 12);
    let tokens: usize = lengths.iter().sum();
    let hidden = heads * head_dim;
    let mut rng = SplitMix64(1000 + head_dim as u64);
    let mut random =
        |shape: &[usize], scale: f64| normal_tensor(&mut rng, shape, (scale, 0.0), dtype);
    // Projections of about 2 standard deviations, as trained BERT's are: peaked softmax rows.
    let x = random(&[1, tokens, hidden], 1.0)?;
    let weight = random(&[3 * hidden, hidden], 2.0 / (hidden as f64).sqrt())?;
    let bias = random(&[3 * hidden], 1.0)?;
    let attend = |device: &Device, dtype: DType| -> Result<Tensor> {
        let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
        let qkv = Linear::new(on(&weight)?, Some(on(&bias)?));
        let packed = PackedSequences::new(&lengths, 100, device)?;
        match fused_qkv_attention(&on(&x)?, &qkv, heads, &packed, false)? {
            QkvAttention::Attended { context, .. } => Ok(context),
            QkvAttention::Projected(_) => Err(Error::SelfTest(format!(
                "no packed attention for {device:?} in {dtype:?}"
            ))),
        }
    };
    let exact = attend(&Device::Cpu, DType::F32)?;
    let kernel = attend(device, dtype)?;
    let name = format!("{dtype:?} packed attention kernel d{head_dim} vs exact").to_lowercase();
    kernel_check(name, dtype, &kernel, &exact)
}

fn encode(model: &BertModel, inputs: &BertInputs) -> Result<(Tensor, Tensor)> {
    encode_with(model, inputs, false)
}

/// [`encode`], padding-free when `skip_padding`.
fn encode_with(
    model: &BertModel,
    inputs: &BertInputs,
    skip_padding: bool,
) -> Result<(Tensor, Tensor)> {
    let options = if skip_padding {
        ForwardOptions::inference().with_skip_padding()
    } else {
        ForwardOptions::inference()
    };
    let out = model.forward(inputs, &options)?;
    let pooled = out.pooler_output.ok_or_else(|| {
        Error::SelfTest("the model has no pooler, but the reference checks one".into())
    })?;
    Ok((out.last_hidden_state, pooled))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradient check runs end to end (on a GPU it compares the device with the CPU; here
    /// the CPU with itself).
    #[test]
    fn the_layer_norm_gradient_check_runs() {
        let check = layer_norm_gradient_check(&Device::Cpu).unwrap();
        assert_eq!(check.value, 0.0, "{}", check.line());
    }

    #[test]
    fn the_softmax_gradient_check_runs() {
        let check = softmax_gradient_check(&Device::Cpu).unwrap();
        assert_eq!(check.value, 0.0, "{}", check.line());
    }

    #[test]
    fn a_nan_or_a_short_value_fails_its_check() {
        let check = |value, limit| Check {
            name: "x".into(),
            value,
            limit,
        };
        assert!(!check(f64::NAN, Limit::AtLeast(HALF_COSINE)).passed());
        assert!(!check(f64::NAN, Limit::AtMost(F32_LIMIT)).passed());
        assert!(!check(0.998, Limit::AtLeast(HALF_COSINE)).passed());
        assert!(check(1.0, Limit::AtLeast(HALF_COSINE)).passed());
        assert!(!check(2e-4, Limit::AtMost(F32_LIMIT)).passed());
        assert!(check(0.0, Limit::AtMost(F32_LIMIT)).passed());
    }
}
