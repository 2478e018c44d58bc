//! The masked-language-model head (`cls.predictions.*`) and `BertForMaskedLM`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use bert_embeddings::nn::{activation, join_path, LayerNorm, Linear, NamedLinears};
use bert_embeddings::{Config, HiddenAct, Result};
use bert_encoder::{BertSelfAttention, ForwardOptions, SelfAttentions};

use crate::model::{BertInputs, BertModel};

/// `predictions.transform.*`: dense, activation, LayerNorm.
#[derive(Debug, Clone)]
pub struct BertPredictionHeadTransform {
    dense: Linear,
    act: HiddenAct,
    layer_norm: LayerNorm,
}

impl BertPredictionHeadTransform {
    /// Loads `dense` and `LayerNorm` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(Self {
            dense: Linear::load(hidden, hidden, vb.pp("dense"))?,
            act: config.hidden_act,
            layer_norm: LayerNorm::load(hidden, config.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `LayerNorm(act(dense(x)))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = activation(self.act, &self.dense.forward(x)?)?;
        Ok(self.layer_norm.forward(&x)?)
    }
}

/// `cls.predictions.*`: transform, then the decoder to vocabulary logits.
#[derive(Debug, Clone)]
pub struct BertLMPredictionHead {
    transform: BertPredictionHeadTransform,
    decoder: Linear,
}

impl BertLMPredictionHead {
    /// Loads the head under `vb` (`cls.predictions`). With `tie_word_embeddings` (HF's default)
    /// the decoder is the word-embedding matrix, as transformers' `tie_weights` makes it, so a
    /// checkpoint that omits `decoder.weight` loads; otherwise `decoder.weight` is read.
    pub fn load(config: &Config, vb: VarBuilder, word_embeddings: &Tensor) -> Result<Self> {
        let decoder_weight = if config.tie_word_embeddings {
            word_embeddings.clone()
        } else {
            vb.get((config.vocab_size, config.hidden_size), "decoder.weight")?
        };
        // transformers ties `decoder.bias` to `predictions.bias`; old checkpoints store only the
        // former.
        let bias = if !vb.contains_tensor("bias") && vb.contains_tensor("decoder.bias") {
            vb.get(config.vocab_size, "decoder.bias")?
        } else {
            vb.get(config.vocab_size, "bias")?
        };
        Ok(Self {
            transform: BertPredictionHeadTransform::load(config, vb.pp("transform"))?,
            decoder: Linear::new(decoder_weight, Some(bias)),
        })
    }

    /// `[batch, seq, hidden]` -> `[batch, seq, vocab]` logits.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        Ok(self
            .decoder
            .forward(&self.transform.forward(hidden_states)?)?)
    }
}

/// What [`BertForMaskedLM::forward`] returns.
#[derive(Debug, Clone)]
pub struct MaskedLMOutput {
    /// `[batch, seq, vocab]` token logits.
    pub logits: Tensor,
    /// Embedding output and every layer's output, when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's attention probabilities, when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

/// `bert.*` (without pooler) + `cls.predictions.*`.
#[derive(Debug, Clone)]
pub struct BertForMaskedLM {
    bert: BertModel,
    predictions: BertLMPredictionHead,
}

impl BertForMaskedLM {
    /// Loads the model under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let bert = BertModel::load(config, vb.pp("bert"), false)?;
        let word_embeddings = bert.embeddings().word_embeddings().weight().clone();
        let predictions =
            BertLMPredictionHead::load(config, vb.pp("cls").pp("predictions"), &word_embeddings)?;
        Ok(Self { bert, predictions })
    }

    /// The encoder under the head.
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// Vocabulary logits for every position.
    pub fn forward(&self, inputs: &BertInputs, options: &ForwardOptions) -> Result<MaskedLMOutput> {
        let out = self.bert.forward(inputs, options)?;
        Ok(MaskedLMOutput {
            logits: self.predictions.forward(&out.last_hidden_state)?,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}

/// The transform's `dense`; the decoder is left out: it is the word-embedding matrix (tied), and
/// an adapter merged into it would untie them.
impl NamedLinears for BertLMPredictionHead {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.transform
            .dense
            .named_linears(&join_path(prefix, "transform.dense"), out);
    }
}

impl SelfAttentions for BertForMaskedLM {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        self.bert.self_attentions(out);
    }
}

impl NamedLinears for BertForMaskedLM {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.bert.named_linears(&join_path(prefix, "bert"), out);
        self.predictions
            .named_linears(&join_path(prefix, "cls.predictions"), out);
    }
}
