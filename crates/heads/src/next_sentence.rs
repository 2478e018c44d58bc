//! The next-sentence-prediction head (`cls.seq_relationship.*`), `BertForNextSentencePrediction`
//! and `BertForPreTraining` (MLM + NSP).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use bert_embeddings::nn::{join_path, Linear, NamedLinears};
use bert_embeddings::{Config, Error, Result};
use bert_encoder::{BertSelfAttention, ForwardOptions, SelfAttentions};

use crate::masked_lm::BertLMPredictionHead;
use crate::model::{BertInputs, BertModel, BertModelOutput};

/// `cls.seq_relationship`: pooled `[CLS]` -> 2 logits (0: B follows A, 1: B is random).
#[derive(Debug, Clone)]
pub struct BertNspHead {
    seq_relationship: Linear,
}

impl BertNspHead {
    /// Loads `seq_relationship` under `vb` (`cls`).
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            seq_relationship: Linear::load(config.hidden_size, 2, vb.pp("seq_relationship"))?,
        })
    }

    /// `[batch, hidden]` pooled output -> `[batch, 2]` logits.
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(self.seq_relationship.forward(pooled)?)
    }
}

fn pooled(out: &BertModelOutput) -> Result<&Tensor> {
    out.pooler_output
        .as_ref()
        .ok_or_else(|| Error::input("next-sentence prediction needs the pooler"))
}

/// What [`BertForNextSentencePrediction::forward`] returns.
#[derive(Debug, Clone)]
pub struct NextSentencePredictorOutput {
    /// `[batch, 2]` logits.
    pub logits: Tensor,
    /// Embedding output and every layer's output, when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's attention probabilities, when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

/// `bert.*` + `cls.seq_relationship.*`.
#[derive(Debug, Clone)]
pub struct BertForNextSentencePrediction {
    bert: BertModel,
    cls: BertNspHead,
}

impl BertForNextSentencePrediction {
    /// Loads the model under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            bert: BertModel::load(config, vb.pp("bert"), true)?,
            cls: BertNspHead::load(config, vb.pp("cls"))?,
        })
    }

    /// The encoder under the head.
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// Next-sentence logits for each pair.
    pub fn forward(
        &self,
        inputs: &BertInputs,
        options: &ForwardOptions,
    ) -> Result<NextSentencePredictorOutput> {
        let out = self.bert.forward(inputs, options)?;
        Ok(NextSentencePredictorOutput {
            logits: self.cls.forward(pooled(&out)?)?,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}

/// What [`BertForPreTraining::forward`] returns.
#[derive(Debug, Clone)]
pub struct PreTrainingOutput {
    /// `[batch, seq, vocab]` masked-LM logits.
    pub prediction_logits: Tensor,
    /// `[batch, 2]` next-sentence logits.
    pub seq_relationship_logits: Tensor,
    /// Embedding output and every layer's output, when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's attention probabilities, when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

/// `bert.*` + `cls.predictions.*` + `cls.seq_relationship.*`.
#[derive(Debug, Clone)]
pub struct BertForPreTraining {
    bert: BertModel,
    predictions: BertLMPredictionHead,
    nsp: BertNspHead,
}

impl BertForPreTraining {
    /// Loads the model under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let bert = BertModel::load(config, vb.pp("bert"), true)?;
        let word_embeddings = bert.embeddings().word_embeddings().weight().clone();
        let cls = vb.pp("cls");
        Ok(Self {
            predictions: BertLMPredictionHead::load(
                config,
                cls.pp("predictions"),
                &word_embeddings,
            )?,
            nsp: BertNspHead::load(config, cls)?,
            bert,
        })
    }

    /// The encoder under the heads.
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// Masked-LM and next-sentence logits.
    pub fn forward(
        &self,
        inputs: &BertInputs,
        options: &ForwardOptions,
    ) -> Result<PreTrainingOutput> {
        let out = self.bert.forward(inputs, options)?;
        Ok(PreTrainingOutput {
            prediction_logits: self.predictions.forward(&out.last_hidden_state)?,
            seq_relationship_logits: self.nsp.forward(pooled(&out)?)?,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}

impl NamedLinears for BertNspHead {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.seq_relationship
            .named_linears(&join_path(prefix, "seq_relationship"), out);
    }
}

impl SelfAttentions for BertForNextSentencePrediction {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        self.bert.self_attentions(out);
    }
}

impl NamedLinears for BertForNextSentencePrediction {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.bert.named_linears(&join_path(prefix, "bert"), out);
        self.cls.named_linears(&join_path(prefix, "cls"), out);
    }
}

impl SelfAttentions for BertForPreTraining {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        self.bert.self_attentions(out);
    }
}

impl NamedLinears for BertForPreTraining {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.bert.named_linears(&join_path(prefix, "bert"), out);
        self.predictions
            .named_linears(&join_path(prefix, "cls.predictions"), out);
        self.nsp.named_linears(&join_path(prefix, "cls"), out);
    }
}
