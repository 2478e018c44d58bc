//! `BertPooler`: dense + tanh over the first (`[CLS]`) token.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use bert_embeddings::nn::{join_path, Linear, NamedLinears};
use bert_embeddings::{Config, Result};

/// `pooler.*`.
#[derive(Debug, Clone)]
pub struct BertPooler {
    dense: Linear,
}

impl BertPooler {
    /// Loads `dense` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense: Linear::load(config.hidden_size, config.hidden_size, vb.pp("dense"))?,
        })
    }

    /// `tanh(dense(hidden_states[:, 0]))`: `[batch, seq, hidden]` -> `[batch, hidden]`;
    /// `train` only matters for a LoRA adapter's dropout.
    pub fn forward(&self, hidden_states: &Tensor, train: bool) -> Result<Tensor> {
        let cls = hidden_states.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.dense.forward_t(&cls, train)?.tanh()?)
    }
}

impl NamedLinears for BertPooler {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.dense.named_linears(&join_path(prefix, "dense"), out);
    }
}
