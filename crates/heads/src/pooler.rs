//! `BertPooler`: dense + tanh over the first (`[CLS]`) token.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use bert_embeddings::nn::Linear;
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

    /// `tanh(dense(hidden_states[:, 0]))`: `[batch, seq, hidden]` -> `[batch, hidden]`.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let cls = hidden_states.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.dense.forward(&cls)?.tanh()?)
    }
}
