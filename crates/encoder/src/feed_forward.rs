//! The position-wise feed-forward block: `BertIntermediate` (dense + activation) and
//! `BertOutput` (dense, dropout, residual, LayerNorm) of transformers' modeling_bert.py.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use bert_embeddings::nn::{
    activation, fused_feed_forward, join_path, Dropout, LayerNorm, Linear, NamedLinears,
};
use bert_embeddings::{Config, HiddenAct, Result};

/// `intermediate.*`: hidden -> intermediate width, then `hidden_act`.
#[derive(Debug, Clone)]
pub struct BertIntermediate {
    dense: Linear,
    act: HiddenAct,
}

impl BertIntermediate {
    /// Loads `dense` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense: Linear::load(config.hidden_size, config.intermediate_size, vb.pp("dense"))?,
            act: config.hidden_act,
        })
    }

    /// `act(dense(x))`; `train` only matters for a LoRA adapter's dropout. In inference the
    /// activation runs inside the dense layer's kernel where it can (`Linear::forward_activation`).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            return Ok(self.dense.forward_activation(x, self.act)?);
        }
        Ok(activation(self.act, &self.dense.forward_t(x, train)?)?)
    }
}

impl NamedLinears for BertIntermediate {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.dense.named_linears(&join_path(prefix, "dense"), out);
    }
}

/// `output.*`: intermediate -> hidden width, dropout, residual and LayerNorm.
#[derive(Debug, Clone)]
pub struct BertOutput {
    dense: Linear,
    layer_norm: LayerNorm,
    dropout: Dropout,
}

impl BertOutput {
    /// Loads `dense` and `LayerNorm` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense: Linear::load(config.intermediate_size, config.hidden_size, vb.pp("dense"))?,
            layer_norm: LayerNorm::load(
                config.hidden_size,
                config.layer_norm_eps,
                vb.pp("LayerNorm"),
            )?,
            dropout: Dropout::new(config.hidden_dropout_prob)?,
        })
    }

    /// `LayerNorm(dropout(dense(intermediate)) + residual)`.
    pub fn forward(&self, intermediate: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            // The residual joins inside the projection (CPU) or the LayerNorm (CUDA) kernel.
            return Ok(self.dense.forward_residual_norm(
                intermediate,
                residual,
                &self.layer_norm,
            )?);
        }
        let projected = self
            .dense
            .forward_dropout(intermediate, Some(&self.dropout), train)?;
        Ok(self.layer_norm.forward(&(projected + residual)?)?)
    }
}

/// `output(intermediate(x), x)` for inference in one CPU kernel where it applies
/// ([`fused_feed_forward`]: f32, AVX-512, batches of a few hundred tokens and more); `None`
/// where it does not, for the two modules' own forward passes.
pub(crate) fn fused_inference(
    intermediate: &BertIntermediate,
    output: &BertOutput,
    x: &Tensor,
) -> Result<Option<Tensor>> {
    Ok(fused_feed_forward(
        x,
        &intermediate.dense,
        intermediate.act,
        &output.dense,
        &output.layer_norm,
    )?)
}

impl NamedLinears for BertOutput {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.dense.named_linears(&join_path(prefix, "dense"), out);
    }
}
