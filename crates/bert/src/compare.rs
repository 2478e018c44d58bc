//! Comparing model outputs: against a reference (parity), across dtypes, batched against alone.
//!
//! One home for the measures [`crate::selftest`] and the integration tests share. Every measure
//! reads a non-finite value as a failure: it comes back as NaN, which no limit accepts, rather
//! than being skipped (`f64::max` drops a NaN; a sum of products does not flag an infinity).

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// The values as f64 on the host (moved first: Metal has no f64; exact for every float dtype).
pub fn host_values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?)
}

/// The larger of two measures, NaN if either is.
pub fn larger(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Largest element-wise |a - b|; NaN if either side has a non-finite value. The shapes must be
/// equal.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: a.shape().clone(),
            rhs: b.shape().clone(),
            op: "max_abs_diff",
        }
        .into());
    }
    let (a, b) = (host_values(a)?, host_values(b)?);
    Ok(a.iter().zip(&b).fold(0.0, |worst, (x, y)| {
        let diff = (x - y).abs();
        larger(worst, if diff.is_finite() { diff } else { f64::NAN })
    }))
}

/// Cosine of two tensors taken as flat vectors; NaN if either has a non-finite value.
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (host_values(a)?, host_values(b)?);
    if a.len() != b.len() || a.iter().chain(&b).any(|x| !x.is_finite()) {
        return Ok(f64::NAN);
    }
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    Ok(dot / (norm(&a) * norm(&b)))
}

/// Whether every element is finite.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(host_values(t)?.iter().all(|x| x.is_finite()))
}

/// `[batch, seq, hidden]` states with the positions a 0/1 `attention_mask` marks as padding set
/// to zero, so comparisons look at real tokens only. A non-finite padded value stays visible:
/// it becomes NaN (`inf * 0`, `NaN * 0`), so the measures above still fail on it.
pub fn real_tokens(states: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(states.dtype())?.unsqueeze(2)?;
    Ok(states.broadcast_mul(&mask)?)
}

/// The number of real tokens in each row of a 0/1 attention mask.
pub fn lengths(attention_mask: &Tensor) -> Result<Vec<usize>> {
    let sums: Vec<f32> = attention_mask.to_dtype(DType::F32)?.sum(1)?.to_vec1()?;
    Ok(sums.into_iter().map(|s| s as usize).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_non_finite_value_is_never_hidden() {
        // The NaN first: a later finite difference must not replace it.
        assert!(max_abs_diff(&t(&[f32::NAN, 2.0]), &t(&[1.0, 2.5]))
            .unwrap()
            .is_nan());
        assert!(max_abs_diff(&t(&[f32::INFINITY]), &t(&[1.0]))
            .unwrap()
            .is_nan());
        assert!(larger(larger(0.0, f64::NAN), 1e-6).is_nan());
        assert!(cosine(&t(&[f32::INFINITY, 1.0]), &t(&[1.0, 1.0]))
            .unwrap()
            .is_nan());
        assert!(!all_finite(&t(&[1.0, f32::NEG_INFINITY])).unwrap());
    }

    #[test]
    fn measures_on_finite_values() {
        assert_eq!(max_abs_diff(&t(&[1.0, 2.0]), &t(&[1.5, 1.0])).unwrap(), 1.0);
        assert!((cosine(&t(&[1.0, 0.0]), &t(&[1.0, 1.0])).unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
        assert!(max_abs_diff(&t(&[1.0, 2.0]), &t(&[1.0])).is_err());
    }

    #[test]
    fn padding_is_zeroed_but_a_padded_infinity_still_shows() {
        let states = Tensor::new(&[[[1f32, 2.0], [f32::INFINITY, 3.0]]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 0]], &Device::Cpu).unwrap();
        assert_eq!(lengths(&mask).unwrap(), [1]);
        let real = real_tokens(&states, &mask).unwrap();
        let values = host_values(&real).unwrap();
        assert_eq!(values[..2], [1.0, 2.0]);
        assert!(values[2].is_nan() && values[3] == 0.0);
    }
}
