//! One transformer block (`BertLayer`): attention, then the feed-forward block.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use bert_embeddings::nn::{join_path, AttentionMask, Linear, NamedLinears};
use bert_embeddings::{Config, Result};

use crate::attention::{BertAttention, BertSelfAttention, SelfAttentions};
use crate::feed_forward::{BertIntermediate, BertOutput};

/// `encoder.layer.N.*`.
#[derive(Debug, Clone)]
pub struct BertLayer {
    attention: BertAttention,
    intermediate: BertIntermediate,
    output: BertOutput,
}

impl BertLayer {
    /// Loads `attention`, `intermediate` and `output` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention: BertAttention::load(config, vb.pp("attention"))?,
            intermediate: BertIntermediate::load(config, vb.pp("intermediate"))?,
            output: BertOutput::load(config, vb.pp("output"))?,
        })
    }

    /// Returns the layer's output and, with `want_probs`, its attention probabilities. `mask`
    /// as for [`BertSelfAttention::forward`].
    pub fn forward<'m>(
        &self,
        hidden_states: &Tensor,
        mask: impl Into<AttentionMask<'m>>,
        train: bool,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (attended, probs) = self
            .attention
            .forward(hidden_states, mask, train, want_probs)?;
        if !train {
            let fused =
                crate::feed_forward::fused_inference(&self.intermediate, &self.output, &attended)?;
            if let Some(out) = fused {
                return Ok((out, probs));
            }
        }
        let intermediate = self.intermediate.forward(&attended, train)?;
        Ok((self.output.forward(&intermediate, &attended, train)?, probs))
    }
}

impl SelfAttentions for BertLayer {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        self.attention.self_attentions(out);
    }
}

impl NamedLinears for BertLayer {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.attention
            .named_linears(&join_path(prefix, "attention"), out);
        self.intermediate
            .named_linears(&join_path(prefix, "intermediate"), out);
        self.output.named_linears(&join_path(prefix, "output"), out);
    }
}
