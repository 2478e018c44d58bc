//! `bert selftest`: the parity fixtures run on a chosen device, so a build can be checked where it
//! runs (a GPU machine, a user's laptop) without the test suite or Python.
//!
//! The reference is what HF transformers computed for all-MiniLM-L6-v2 on five single texts and
//! four sentence pairs, each set padded into one batch (`tests/fixtures/minilm/outputs.safetensors`,
//! written by `tests/scripts/generate_fixtures.py`; compiled into the binary). Checks, per batch:
//! - f32: `last_hidden_state` on real tokens and `pooler_output` within [`F32_LIMIT`] of
//!   transformers (TF32 off on CUDA, so f32 matmuls stay f32);
//! - f16 and bf16: every output finite, and cosine >= [`HALF_COSINE`] to our f32 result;
//! - each text alone equals its row of the padded batch (f32), within [`F32_LIMIT`].
//!
//! Padded positions are left out of value comparisons for the reason `tests/tests/parity_minilm.rs`
//! gives (transformers' own f32 states there are ill-conditioned), but must still be finite.

use std::collections::HashMap;

use anyhow::{Context, Result};
use bert::{load, BertInputs, BertModel, DType, Device, ForwardOptions, ModelFiles, Tensor};

/// transformers' outputs for all-MiniLM-L6-v2 (input ids, masks, token types and results).
const FIXTURE: &[u8] = include_bytes!("../../../tests/fixtures/minilm/outputs.safetensors");

/// Largest element-wise difference allowed in f32, against transformers and batched vs alone.
pub const F32_LIMIT: f64 = 1e-4;
/// Smallest cosine allowed between a half-precision result and the f32 one.
pub const HALF_COSINE: f64 = 0.999;

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

/// The compiled-in fixture's tensors, on the CPU.
pub fn fixture() -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(FIXTURE, &Device::Cpu)
        .context("reading the compiled-in fixture")
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
    let model = |dtype| -> Result<BertModel> {
        Ok(load::<BertModel>(files, dtype, device)
            .with_context(|| format!("loading all-MiniLM-L6-v2 in {dtype:?}"))?
            .model)
    };
    let f32_model = model(DType::F32)?;
    let half_models = [
        (DType::F16, model(DType::F16)?),
        (DType::BF16, model(DType::BF16)?),
    ];
    let tensor = |name: &str| -> Result<Tensor> {
        expected
            .get(name)
            .with_context(|| format!("the fixture has no tensor {name}"))?
            .to_device(device)
            .with_context(|| format!("moving {name} to the device"))
    };

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

        for (dtype, half_model) in &half_models {
            let (half_hidden, half_pooled) = encode(half_model, &inputs)?;
            let name = format!("{dtype:?}").to_lowercase();
            checks.push(Check {
                name: format!("{batch} {name} last_hidden_state vs f32"),
                value: finite_cosine(&half_hidden, &hidden, &mask)?,
                limit: Limit::AtLeast(HALF_COSINE),
            });
            checks.push(Check {
                name: format!("{batch} {name} pooler_output vs f32"),
                value: finite_cosine(&half_pooled, &pooled, &Tensor::ones_like(&pooled)?)?,
                limit: Limit::AtLeast(HALF_COSINE),
            });
        }

        // Each row alone, cut to its real tokens, against its row of the padded batch.
        let lengths: Vec<f32> = mask.to_dtype(DType::F32)?.sum(1)?.to_vec1()?;
        let mut worst = 0f64;
        for (row, length) in lengths.into_iter().enumerate() {
            let cut = |t: &Tensor| t.narrow(0, row, 1)?.narrow(1, 0, length as usize);
            let (ids, mask, types) = (cut(&ids)?, cut(&mask)?, cut(&types)?);
            let alone = BertInputs::new(&ids)
                .with_attention_mask(&mask)
                .with_token_type_ids(&types);
            let (alone_hidden, alone_pooled) = encode(&f32_model, &alone)?;
            let batched = hidden.narrow(0, row, 1)?.narrow(1, 0, length as usize)?;
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
    Ok(checks)
}

fn encode(model: &BertModel, inputs: &BertInputs) -> Result<(Tensor, Tensor)> {
    let out = model.forward(inputs, &ForwardOptions::inference())?;
    let pooled = out
        .pooler_output
        .context("all-MiniLM-L6-v2 has a pooler, but the model returned none")?;
    Ok((out.last_hidden_state, pooled))
}

/// The values as f64 on the host (moved first: Metal has no f64).
fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?)
}

/// The larger of two differences, NaN if either is (`f64::max` would drop a NaN).
fn larger(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// `[batch, seq, hidden]` states with padded positions (mask 0) set to zero.
fn real_tokens(states: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(states.dtype())?.unsqueeze(2)?;
    Ok(states.broadcast_mul(&mask)?)
}

/// Largest element-wise difference; NaN if either side has a non-finite value.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (values(a)?, values(b)?);
    anyhow::ensure!(
        a.len() == b.len(),
        "shapes differ: {} against {} values",
        a.len(),
        b.len()
    );
    Ok(a.iter().zip(&b).fold(0f64, |worst, (x, y)| {
        let diff = (x - y).abs();
        larger(worst, if diff.is_finite() { diff } else { f64::NAN })
    }))
}

/// Cosine between `half` and `full` on real tokens (`mask` broadcast over the last axis where
/// `half` has three); NaN if `half` has a non-finite value anywhere, padding included.
fn finite_cosine(half: &Tensor, full: &Tensor, mask: &Tensor) -> Result<f64> {
    if values(half)?.iter().any(|x| !x.is_finite()) {
        return Ok(f64::NAN);
    }
    let (half, full) = if half.rank() == 3 {
        (real_tokens(half, mask)?, real_tokens(full, mask)?)
    } else {
        (half.clone(), full.clone())
    };
    let (a, b) = (values(&half)?, values(&full)?);
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    Ok(dot / (norm(&a) * norm(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> ModelFiles {
        bert::DEFAULT_MODEL
            .parse::<bert::ModelSource>()
            .and_then(|source| source.fetch())
            .expect("the default model fetches")
    }

    #[test]
    fn passes_on_the_cpu_and_fails_when_the_reference_moves() {
        let files = minilm();
        let expected = fixture().unwrap();
        let checks = run(&files, &Device::Cpu, &expected).unwrap();
        assert_eq!(checks.len(), 2 * 7);
        for check in &checks {
            assert!(check.passed(), "{}", check.line());
        }

        // Moving one reference value by 2e-4 must fail exactly the check that reads it.
        let mut moved = expected.clone();
        let pooled = &expected["pair.pooler_output"];
        let bump = (Tensor::ones_like(pooled).unwrap() * 2e-4).unwrap();
        moved.insert("pair.pooler_output".into(), (pooled + bump).unwrap());
        let failed: Vec<_> = run(&files, &Device::Cpu, &moved)
            .unwrap()
            .into_iter()
            .filter(|check| !check.passed())
            .map(|check| check.name)
            .collect();
        assert_eq!(failed, ["pair f32 pooler_output vs transformers"]);
    }

    #[test]
    fn non_finite_values_fail() {
        let good = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        // The NaN first: a later finite difference must not hide it.
        let bad = Tensor::new(&[[f32::NAN, 2.0]], &Device::Cpu).unwrap();
        let ones = Tensor::ones_like(&good).unwrap();
        assert!(max_abs_diff(&bad, &good).unwrap().is_nan());
        assert!(larger(larger(0.0, f64::NAN), 1e-6).is_nan());
        assert!(finite_cosine(&bad, &good, &ones).unwrap().is_nan());
        let check = |value| Check {
            name: "x".into(),
            value,
            limit: Limit::AtLeast(HALF_COSINE),
        };
        assert!(!check(f64::NAN).passed());
        assert!(check(finite_cosine(&good, &good, &ones).unwrap()).passed());
    }
}
