//! The additive attention bias built from a padding mask.
//!
//! transformers turns the `[batch, seq]` 0/1 mask into `(1 - mask) * finfo(dtype).min` in the
//! model's dtype (`get_extended_attention_mask`). In f16 that bias plus a negative score can
//! round to -inf, and candle-transformers' variant yields NaN rows. Here the bias is always f32
//! and attention scores are promoted to f32 before it is added, so the masked softmax is finite
//! and exact in every dtype.

use candle_core::{DType, Tensor};

use bert_embeddings::{Error, Result};

/// The value added to the score of a padded key: the most negative finite f32, as HF uses
/// `torch.finfo(torch.float32).min`.
pub const MASKED_SCORE: f64 = f32::MIN as f64;

/// Additive bias `[batch, 1, 1, seq]` (f32): `(1 - mask) * MASKED_SCORE`, so 0 where
/// `attention_mask` is 1 and [`MASKED_SCORE`] where it is 0.
pub fn padding_bias(attention_mask: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
    if attention_mask.dims() != [batch, seq] {
        return Err(Error::input(format!(
            "attention_mask must be [batch, seq] = [{batch}, {seq}], got {:?}",
            attention_mask.dims()
        )));
    }
    let mask = attention_mask.to_dtype(DType::F32)?;
    // m * (-MIN) + MIN == (1 - m) * MIN, exactly 0 for m = 1.
    let bias = mask.affine(-MASKED_SCORE, MASKED_SCORE)?;
    Ok(bias.reshape((batch, 1, 1, seq))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bias_is_zero_for_tokens_and_min_for_padding() {
        let mask = Tensor::new(&[[1u32, 1, 0], [1, 0, 0]], &Device::Cpu).unwrap();
        let bias = padding_bias(&mask, 2, 3).unwrap();
        assert_eq!(bias.dims(), &[2, 1, 1, 3]);
        let values = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values, vec![0.0, 0.0, f32::MIN, 0.0, f32::MIN, f32::MIN]);
        assert!(padding_bias(&mask, 3, 2).is_err());
    }
}
