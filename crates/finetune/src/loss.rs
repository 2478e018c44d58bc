//! Losses, numerically stable in every regime.

use candle_core::{DType, Tensor, D};

use bert::{Config, ProblemType};

use crate::error::{Error, Result};

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Binary cross-entropy on logits: one-label cross-encoders (labels in [0, 1]) and
    /// multi-label classification.
    BceWithLogits,
    /// Softmax cross-entropy: single-label classification (integer class labels).
    CrossEntropy,
    /// Mean squared error: regression.
    Mse,
}

impl Loss {
    /// The loss transformers' `BertForSequenceClassification` picks from `problem_type` and
    /// `num_labels`, except that a one-label model without a `problem_type` is a cross-encoder
    /// trained with BCE on [0, 1] targets, as sentence-transformers' `CrossEncoder.fit` does.
    pub fn for_config(config: &Config) -> Self {
        match config.problem_type {
            Some(ProblemType::Regression) => Self::Mse,
            Some(ProblemType::SingleLabelClassification) => Self::CrossEntropy,
            Some(ProblemType::MultiLabelClassification) => Self::BceWithLogits,
            None if config.num_labels == 1 => Self::BceWithLogits,
            None => Self::CrossEntropy,
        }
    }

    /// Mean loss of `logits` (`[batch, num_labels]`) against `targets`: `[batch]` floats for
    /// one-label BCE and MSE, `[batch]` class indices (as floats) for cross-entropy,
    /// `[batch, num_labels]` for multi-label BCE.
    pub fn compute(self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        // f32 for half-precision logits; f32 and f64 stay as they are.
        let dtype = bert::bert_embeddings::nn::compute_dtype(logits.dtype());
        let logits = logits.to_dtype(dtype)?;
        let targets = targets.to_dtype(dtype)?;
        let (_, labels) = logits.dims2()?;
        match self {
            Self::BceWithLogits | Self::Mse => {
                let targets = if targets.rank() == 1 && labels == 1 {
                    targets.unsqueeze(1)?
                } else {
                    targets
                };
                if targets.dims() != logits.dims() {
                    return Err(Error::Setting(format!(
                        "targets {:?} do not match logits {:?}",
                        targets.dims(),
                        logits.dims()
                    )));
                }
                if self == Self::Mse {
                    Ok((logits - targets)?.sqr()?.mean_all()?)
                } else {
                    bce_with_logits(&logits, &targets)
                }
            }
            Self::CrossEntropy => cross_entropy(&logits, &targets.to_dtype(DType::U32)?),
        }
    }
}

/// Mean binary cross-entropy of `targets` under `sigmoid(logits)`, in the log-sum-exp form
/// `max(x, 0) - x*y + log(1 + exp(-|x|))`: finite for any finite logit (candle's
/// `binary_cross_entropy_with_logit` takes `log(sigmoid(x))`, which is -inf past |x| ~ 100).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let loss = ((logits.relu()? - (logits * targets)?)? + softplus_neg_abs)?;
    Ok(loss.mean_all()?)
}

/// Mean softmax cross-entropy with integer `classes` (`[batch]`), via a max-shifted log-softmax.
pub fn cross_entropy(logits: &Tensor, classes: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let log_norm = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_norm)?;
    let picked = log_probs.gather(&classes.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar(t: Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn bce_is_exact_and_finite_at_extreme_logits() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[1e4f32], [-1e4], [0.0], [2.0]], &dev).unwrap();
        let targets = Tensor::new(&[[0f32], [1.0], [1.0], [0.25]], &dev).unwrap();
        let loss = scalar(bce_with_logits(&logits, &targets).unwrap());
        // Each term by hand: 1e4, 1e4, ln 2, 2 - 0.5 + ln(1 + e^-2).
        let expected = (1e4 + 1e4 + 2f64.ln() + (1.5 + (1.0 + (-2f64).exp()).ln())) / 4.0;
        assert!(
            (loss as f64 - expected).abs() < 1e-2,
            "{loss} vs {expected}"
        );
        assert!(loss.is_finite());
        // Its gradient is finite too: sigmoid(x) - y.
        let var = candle_core::Var::from_tensor(&logits).unwrap();
        let grads = bce_with_logits(var.as_tensor(), &targets)
            .unwrap()
            .backward()
            .unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let expected = [
            1.0 / 4.0,
            -1.0 / 4.0,
            -0.5 / 4.0,
            (1.0 / (1.0 + (-2f32).exp()) - 0.25) / 4.0,
        ];
        for (a, b) in g.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn cross_entropy_and_mse_match_hand_computation() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[1f32, 2.0, 3.0], [1000.0, 0.0, -1000.0]], &dev).unwrap();
        let classes = Tensor::new(&[2f32, 0.0], &dev).unwrap();
        let loss = scalar(Loss::CrossEntropy.compute(&logits, &classes).unwrap());
        let first = -(3f64 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln());
        assert!((loss as f64 - first / 2.0).abs() < 1e-5, "{loss}");
        let mse = scalar(
            Loss::Mse
                .compute(
                    &Tensor::new(&[[1f32], [3.0]], &dev).unwrap(),
                    &Tensor::new(&[0f32, 1.0], &dev).unwrap(),
                )
                .unwrap(),
        );
        assert!((mse - 2.5).abs() < 1e-6);
    }

    #[test]
    fn loss_follows_problem_type() {
        let config = |json: serde_json::Value| Config::from_json_value(json).unwrap();
        assert_eq!(
            Loss::for_config(&config(serde_json::json!({"num_labels": 1}))),
            Loss::BceWithLogits
        );
        assert_eq!(
            Loss::for_config(&config(
                serde_json::json!({"num_labels": 1, "problem_type": "regression"})
            )),
            Loss::Mse
        );
        assert_eq!(
            Loss::for_config(&config(serde_json::json!({"num_labels": 3}))),
            Loss::CrossEntropy
        );
        assert_eq!(
            Loss::for_config(&config(
                serde_json::json!({"num_labels": 3, "problem_type": "multi_label_classification"})
            )),
            Loss::BceWithLogits
        );
    }
}
