//! `BertForSequenceClassification`: pooled `[CLS]` -> dropout -> linear, and the activation that
//! turns its logits into probabilities.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use bert_embeddings::nn::{join_path, softmax_last_dim, Dropout, Linear, NamedLinears};
use bert_embeddings::{Config, Error, ProblemType, Result};
use bert_encoder::{BertSelfAttention, ForwardOptions, SelfAttentions};

use crate::model::{BertInputs, BertModel};

/// How logits become probabilities, chosen as transformers' text-classification pipeline does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifierActivation {
    /// Independent sigmoid per label: one label (the cross-encoder's pair probability) or
    /// `multi_label_classification`.
    Sigmoid,
    /// Softmax over labels: single-label classification with several classes.
    Softmax,
}

impl ClassifierActivation {
    /// `multi_label_classification` or one label -> sigmoid; otherwise softmax.
    pub fn for_config(config: &Config) -> Self {
        if config.problem_type == Some(ProblemType::MultiLabelClassification)
            || config.num_labels == 1
        {
            Self::Sigmoid
        } else {
            Self::Softmax
        }
    }

    /// Applies the activation to `[batch, num_labels]` logits.
    pub fn apply(self, logits: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Sigmoid => candle_nn::ops::sigmoid(logits)?,
            Self::Softmax => softmax_last_dim(logits)?,
        })
    }
}

/// What [`BertForSequenceClassification::forward`] returns.
#[derive(Debug, Clone)]
pub struct SequenceClassifierOutput {
    /// `[batch, num_labels]` raw scores.
    pub logits: Tensor,
    /// Embedding output and every layer's output, when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's attention probabilities, when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

/// `bert.*` + `classifier.*`.
#[derive(Debug, Clone)]
pub struct BertForSequenceClassification {
    bert: BertModel,
    dropout: Dropout,
    classifier: Linear,
    activation: ClassifierActivation,
}

impl BertForSequenceClassification {
    /// Loads `bert.*` (with pooler) and `classifier.*` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            bert: BertModel::load(config, vb.pp("bert"), true)?,
            dropout: Dropout::new(config.classifier_dropout_prob())?,
            classifier: Linear::load(config.hidden_size, config.num_labels, vb.pp("classifier"))?,
            activation: ClassifierActivation::for_config(config),
        })
    }

    /// The encoder under the head.
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// The activation [`Self::probabilities`] applies.
    pub fn activation(&self) -> ClassifierActivation {
        self.activation
    }

    /// Logits for each input.
    pub fn forward(
        &self,
        inputs: &BertInputs,
        options: &ForwardOptions,
    ) -> Result<SequenceClassifierOutput> {
        let out = self.bert.forward(inputs, options)?;
        let pooled = out
            .pooler_output
            .ok_or_else(|| Error::input("sequence classification needs the pooler"))?;
        let pooled = self.dropout.forward(&pooled, options.train)?;
        Ok(SequenceClassifierOutput {
            logits: self.classifier.forward(&pooled)?,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }

    /// Probabilities for each input (`[batch, num_labels]`), in inference mode. A batch padded
    /// at its rows' ends runs padding-free ([`ForwardOptions::skip_padding`]): the scores read
    /// `[CLS]` only, so padded positions would be work for nothing.
    pub fn probabilities(&self, inputs: &BertInputs) -> Result<Tensor> {
        let options = ForwardOptions::inference().with_skip_padding();
        let logits = self.forward(inputs, &options)?.logits;
        self.activation.apply(&logits)
    }
}

impl SelfAttentions for BertForSequenceClassification {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        self.bert.self_attentions(out);
    }
}

impl NamedLinears for BertForSequenceClassification {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.bert.named_linears(&join_path(prefix, "bert"), out);
        self.classifier
            .named_linears(&join_path(prefix, "classifier"), out);
    }
}
